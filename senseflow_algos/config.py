"""Run configuration: YAML + dotted command-line overrides, validated against ``yamls/schema.yaml``.

Imports nothing heavy (no torch, no Composer), so a bad key fails before any model is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yamale
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ['ConfigError', 'load_config', 'validate_config', 'DEFAULT_SCHEMA']

#: The schema every run config is validated against.
DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / 'yamls' / 'schema.yaml'


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the offending keys."""


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML run config and apply ``dotted.key=value`` overrides.

    Args:
        path: The YAML file.
        overrides: Command-line overrides such as ``trainer.save_folder=/tmp/run``.

    Returns:
        The resolved config as plain Python containers.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ConfigError(f'overrides must look like dotted.key=value, got {bad}')
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f'{path}: {e}') from e
    if not isinstance(resolved, dict):
        raise ConfigError(f'{path}: the top level must be a mapping')
    return resolved


def validate_config(cfg: dict[str, Any], source: str = 'config', schema_path: str | os.PathLike = DEFAULT_SCHEMA) -> None:
    """Validate ``cfg`` strictly against the yamale schema (unknown keys are errors).

    Raises:
        ConfigError: Listing every offending key path, e.g. ``model.gen_evry: Unexpected element``.
    """
    schema = yamale.make_schema(str(schema_path))
    try:
        yamale.validate(schema, [(cfg, source)], strict=True)
    except yamale.YamaleError as e:
        errors = [err for result in e.results for err in result.errors]
        raise ConfigError(f'{source} does not match {schema_path}:\n  ' + '\n  '.join(errors)) from None
