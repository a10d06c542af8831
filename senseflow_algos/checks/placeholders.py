"""No ``<placeholder>`` left in a run config: the MCLI run files ship with ``<bucket>``, ``<images-mds>`` ... for the
user to fill in, and a run that starts with one fails much later (at the first checkpoint or data download)."""

from __future__ import annotations

import re
from typing import Any, Iterator

from senseflow_algos.config import ConfigError

__all__ = ['PLACEHOLDER', 'check_no_placeholders']

#: ``<name>`` as the run files write a value the user must replace.
PLACEHOLDER = re.compile(r'<[A-Za-z][\w-]*>')


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f'{path}.{key}' if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f'{path}[{i}]')
    elif isinstance(node, str):
        yield path, node


def check_no_placeholders(cfg: dict[str, Any], source: str) -> None:
    """Raise naming every key whose value still holds a ``<placeholder>``."""
    left = [f'{key}={value!r}' for key, value in _strings(cfg, '') if PLACEHOLDER.search(value)]
    if left:
        raise ConfigError(f'{source}: replace the placeholders first: ' + ', '.join(left))
