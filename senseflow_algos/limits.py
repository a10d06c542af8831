"""Value ranges of the config keys whose classes are also Python API, one rule per key.

:func:`~senseflow_algos.config.validate_config` applies every rule to a run config before anything loads, and the
constructors (``DMDModel``, the algorithms, ...) call :func:`check` on their own arguments, so the YAML and the
Python API refuse the same values with the same message. ``yamls/schema.yaml`` states only these keys' types
(``tests/test_schema_signatures.py`` checks that it restates no range held here). Imports nothing heavy.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

__all__ = ['AtLeast', 'Between', 'OneOf', 'Pair', 'RULES', 'check', 'config_problems', 'ISG_LOSS_TYPES', 'REFERENCE_MAPS',
           'ON_NONFINITE']

#: ``algorithms.isg.loss_type`` choices.
ISG_LOSS_TYPES = ('charbonnier', 'l2')
#: How a VFM head combines the reference image's map with the text projection: ``per_location`` adds the spatial
#: reference map location by location (the released code); ``pooled`` averages it to one vector per sample first.
REFERENCE_MAPS = ('per_location', 'pooled')
#: ``optimizer.on_nonfinite`` choices.
ON_NONFINITE = ('stop', 'skip')


class AtLeast(NamedTuple):
    """``value >= low`` (``integer``: also a whole number, not a bool)."""
    low: float
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        if self.integer and (isinstance(value, bool) or int(value) != value or value < self.low):
            return f'must be an integer >= {self.low}, got {value!r}'
        return None if value >= self.low else f'must be >= {self.low}, got {value}'


class Between(NamedTuple):
    """``lo <= value <= hi``."""
    lo: float
    hi: float

    def problem(self, value: Any) -> str | None:
        return None if self.lo <= value <= self.hi else f'must be in [{self.lo}, {self.hi}], got {value}'


class OneOf(NamedTuple):
    """``value in choices``."""
    choices: Sequence[str]

    def problem(self, value: Any) -> str | None:
        return None if value in self.choices else f'must be one of {list(self.choices)}, got {value!r}'


class Pair(NamedTuple):
    """``[lo, hi]``: two numbers, each ``>= low``."""
    low: float

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(v >= self.low for v in value)
        return None if ok else f'must be [lo, hi] (two numbers >= {self.low}), got {value!r}'


Rule = Union[AtLeast, Between, OneOf, Pair]

#: Config path -> its rule.
RULES: dict[str, Rule] = {
    'model.num_steps': AtLeast(1, integer=True),
    'model.gen_every': AtLeast(1),
    'model.backsim_prob': Between(0, 1),
    'model.lora.rank': AtLeast(1),
    'algorithms.ida.lam': Between(0, 1),
    'algorithms.isg.loss_type': OneOf(ISG_LOSS_TYPES),
    'algorithms.isg.guidance': Pair(0),
    'algorithms.vfm_discriminator.generator_weight': AtLeast(0),
    'algorithms.vfm_discriminator.reference_map': OneOf(REFERENCE_MAPS),
    'callbacks.sample_grid.every_n_batches': AtLeast(1),
    'optimizer.on_nonfinite': OneOf(ON_NONFINITE),
}


def check(key: str, value: Any) -> Any:
    """Return ``value`` if it satisfies ``RULES[key]``.

    Raises:
        ValueError: Naming ``key``, e.g. ``model.gen_every must be >= 1, got 0``.
    """
    problem = RULES[key].problem(value)
    if problem:
        raise ValueError(f'{key} {problem}')
    return value


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Every rule a (schema-valid) run config breaks, as ``'<key> <problem>'``; absent or null keys are skipped."""
    problems = []
    for key, rule in RULES.items():
        value: Any = cfg
        for part in key.split('.'):
            value = value.get(part) if isinstance(value, dict) else None
        problem = None if value is None else rule.problem(value)
        if problem:
            problems.append(f'{key} {problem}')
    return problems
