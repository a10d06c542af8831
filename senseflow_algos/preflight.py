"""Checks of a validated run config that need more than the schema, run before torch, Composer or any model loads.

``train.py`` calls :func:`preflight` right after :func:`~senseflow_algos.config.validate_config`, so a run that
cannot work (no training data, a teacher that cannot be found, weights that would not train) stops in about a
second with a message naming the key, instead of after minutes of loading. Every check is a function
``check(cfg, source) -> None`` that raises :class:`~senseflow_algos.config.ConfigError`; :data:`CHECKS` lists them in
the order they run. Checks import nothing heavy.
"""

from __future__ import annotations

from typing import Any, Callable

from senseflow_algos.checks.placeholders import check_no_placeholders
from senseflow_algos.checks.teacher_source import check_teacher_source
from senseflow_algos.checks.trained_precision import check_trained_precision
from senseflow_algos.checks.training_data import check_training_data
from senseflow_algos.config import ConfigError

__all__ = ['CHECKS', 'ConfigError', 'preflight']

Check = Callable[[dict[str, Any], str], None]

#: The checks :func:`preflight` runs, in order (cheap and local first; a network lookup last).
CHECKS: list[Check] = [
    check_no_placeholders,
    check_training_data,
    check_trained_precision,
    check_teacher_source,
]


def preflight(cfg: dict[str, Any], source: str = 'config') -> None:
    """Run every check of :data:`CHECKS` on a schema-valid config.

    Raises:
        ConfigError: From the first check that fails, naming the offending key.
    """
    for check in CHECKS:
        check(cfg, source)

