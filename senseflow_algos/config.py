"""Run configuration: YAML + dotted command-line overrides, validated against ``yamls/schema.yaml``.

Imports nothing heavy (no torch, no Composer), so a bad key fails before any model is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yamale
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from senseflow_algos.limits import config_problems

__all__ = ['ConfigError', 'load_config', 'validate_config', 'run_seed', 'DEFAULT_SCHEMA', 'DEFAULT_SEED',
           'DEFAULT_OPTIMIZER']

#: The schema every run config is validated against.
DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / 'yamls' / 'schema.yaml'

#: The run's ``seed`` when the config has none.
DEFAULT_SEED = 17
#: ``optimizer.kind`` when the config has none (read by the builders, the planner and the preflight checks).
DEFAULT_OPTIMIZER = 'adamw'


def run_seed(cfg: dict[str, Any]) -> int:
    """The run config's ``seed`` (default :data:`DEFAULT_SEED`)."""
    return cfg.get('seed', DEFAULT_SEED)


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the offending keys."""


def _load_with_base(path: Path, seen: tuple[Path, ...] = ()):
    """Load ``path``; a top-level ``base: other.yaml`` (relative to ``path``) is loaded first and merged under it."""
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}' + (f' (base of {seen[-1]})' if seen else ''))
    if path.resolve() in seen:
        raise ConfigError(f'config base cycle: {" -> ".join(str(p) for p in (*seen, path))}')
    cfg = OmegaConf.load(path)
    base = cfg.pop('base', None)
    if base is None:
        return cfg
    return OmegaConf.merge(_load_with_base(path.parent / str(base), (*seen, path.resolve())), cfg)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML run config and apply ``dotted.key=value`` overrides.

    A config may start from another one with a top-level ``base: <path relative to this file>``; its keys are
    deep-merged over the base's. An entry of ``algorithms:``, ``callbacks:`` or ``loggers:`` set to ``null`` is off
    (that is how ablations drop an algorithm); ``{}`` keeps it with its defaults.

    Args:
        path: The YAML file.
        overrides: Command-line overrides such as ``trainer.save_folder=/tmp/run`` or ``algorithms.isg=null``.

    Returns:
        The resolved config as plain Python containers.
    """
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ConfigError(f'overrides must look like dotted.key=value, got {bad}')
    try:
        cfg = OmegaConf.merge(_load_with_base(Path(path)), OmegaConf.from_dotlist(list(overrides)))
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f'{path}: {e}') from e
    if not isinstance(resolved, dict):
        raise ConfigError(f'{path}: the top level must be a mapping')
    return resolved


def validate_config(cfg: dict[str, Any], source: str = 'config', schema_path: str | os.PathLike = DEFAULT_SCHEMA) -> None:
    """Validate ``cfg`` strictly against the yamale schema (unknown keys are errors).

    The value ranges of :data:`senseflow_algos.limits.RULES` are checked once the types are right.

    Raises:
        ConfigError: Listing every offending key path, e.g. ``model.gen_evry: Unexpected element``.
    """
    schema = yamale.make_schema(str(schema_path))
    try:
        yamale.validate(schema, [(cfg, source)], strict=True)
    except yamale.YamaleError as e:
        errors = [err for result in e.results for err in result.errors]
        raise ConfigError(f'{source} does not match {schema_path}:\n  ' + '\n  '.join(errors)) from None
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f'{source}:\n  ' + '\n  '.join(problems))
