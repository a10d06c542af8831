"""Constructor signatures are the one home of their defaults: code that needs a default it does not pass reads it
here instead of restating it."""

from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ['defaults_of']


def defaults_of(*functions: Callable) -> dict[str, Any]:
    """``{parameter: default}`` of the parameters of ``functions`` that have one (a class: its ``__init__``); a name
    two of them define takes the first one's default."""
    out: dict[str, Any] = {}
    for fn in reversed(functions):
        out.update({name: p.default for name, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty})
    return out
