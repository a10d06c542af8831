"""Run configuration: YAML + dotted command-line overrides, validated against ``yamls/schema.yaml`` and the
registries of names (:mod:`senseflow_algos.registry`).

Imports nothing heavy (no torch, no Composer), so a bad key fails before any model is built; only the modules a
config lists under ``plugins:`` are imported.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import yamale
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from senseflow_algos.limits import config_problems
from senseflow_algos.registry import ALGORITHMS, CALLBACKS, DATASETS, Registry

__all__ = ['ConfigError', 'load_config', 'validate_config', 'import_plugins', 'run_seed', 'DEFAULT_SCHEMA',
           'DEFAULT_SEED', 'DEFAULT_OPTIMIZER']

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


def import_plugins(cfg: dict[str, Any], source: str = 'config') -> None:
    """Import the modules listed under ``plugins:``; each registers its names (see :mod:`senseflow_algos.registry`).

    Raises:
        ConfigError: A module that cannot be imported, naming its ``plugins[i]`` entry.
    """
    plugins = cfg.get('plugins') or []
    if not isinstance(plugins, list):
        return  # the schema reports it
    for i, module in enumerate(plugins):
        try:
            importlib.import_module(str(module))
        except ImportError as e:
            raise ConfigError(f'{source}: plugins[{i}]={module!r} cannot be imported ({e})') from e


def validate_config(cfg: dict[str, Any], source: str = 'config', schema_path: str | os.PathLike = DEFAULT_SCHEMA) -> None:
    """Validate ``cfg`` strictly against the yamale schema (unknown keys are errors) and its names against the
    registries: ``dataset.kind`` must be a registered kind, every ``algorithms:`` / ``callbacks:`` entry a registered
    name. The modules under ``plugins:`` are imported first. An entry a plugin registered that the schema does not
    describe has its kwargs checked against the registered class's signature instead.

    The value ranges of :data:`senseflow_algos.limits.RULES` are checked once the types are right.

    Raises:
        ConfigError: Listing every offending key path, e.g. ``model.gen_evry: Unexpected element``.
    """
    schema = yamale.make_schema(str(schema_path))
    import_plugins(cfg, source)
    described, errors = _without_plugin_entries(cfg, schema)
    try:
        yamale.validate(schema, [(described, source)], strict=True)
    except yamale.YamaleError as e:
        errors = [err for result in e.results for err in result.errors] + errors
    dataset = cfg.get('dataset')
    kind = dataset.get('kind') if isinstance(dataset, dict) else None
    if isinstance(kind, str) and kind not in DATASETS:
        errors.append(DATASETS.unknown_message(kind))
    if errors:
        raise ConfigError(f'{source} does not match {schema_path}:\n  ' + '\n  '.join(errors)) from None
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f'{source}:\n  ' + '\n  '.join(problems))


def _without_plugin_entries(cfg: dict[str, Any], schema) -> tuple[dict[str, Any], list[str]]:
    """``cfg`` less what the schema does not describe but a registry does, and the errors of those parts.

    ``algorithms:`` / ``callbacks:`` entries the schema lacks: a name no one registered, or kwargs its registered
    class does not take. ``dataset:`` keys the schema lacks, for a kind a plugin registered (not the library's own
    kinds, which the schema describes): keywords its builder does not take.
    """
    out, errors = dict(cfg), []
    dataset, include = cfg.get('dataset'), schema.includes.get('dataset')
    kind = dataset.get('kind') if isinstance(dataset, dict) else None
    if isinstance(kind, str) and kind in DATASETS and not DATASETS.is_lazy(kind) and include is not None:
        extra = {k: v for k, v in dataset.items() if k not in include.dict}
        if extra:
            out['dataset'] = {k: v for k, v in dataset.items() if k in include.dict}
            problem = _signature_problem(DATASETS.lookup(kind), extra, partial=True)
            if problem:
                errors.append(f'dataset (kind {kind}): {problem}')
    for registry in (ALGORITHMS, CALLBACKS):
        section, include = cfg.get(registry.key), schema.includes.get(registry.key)
        if not isinstance(section, dict) or include is None:
            continue
        out[registry.key] = {name: kw for name, kw in section.items() if name in include.dict}
        for name, kwargs in section.items():
            if name not in include.dict:
                problem = _plugin_entry_problem(registry, name, kwargs)
                if problem:
                    errors.append(problem)
    return out, errors


def _plugin_entry_problem(registry: Registry, name: str, kwargs: Any) -> str | None:
    """Why ``<registry.key>.<name>: kwargs`` cannot build the registered class, else ``None``."""
    if name not in registry:
        return registry.unknown_message(name)
    if kwargs is None:
        return None  # switched off
    if not isinstance(kwargs, dict):
        return f'{registry.key}.{name}: expected a mapping of keyword arguments (or null), got {kwargs!r}'
    problem = _signature_problem(registry.lookup(name), kwargs)
    return f'{registry.key}.{name}: {problem}' if problem else None


def _signature_problem(builder: Any, kwargs: dict[str, Any], partial: bool = False) -> str | None:
    """Why ``builder(**kwargs)`` would not bind (``partial``: other required arguments come later), else ``None``."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return None  # no signature to read: the builder reports bad kwargs itself
    try:
        (signature.bind_partial if partial else signature.bind)(**kwargs)
    except TypeError as e:
        return f'{e} ({getattr(builder, "__qualname__", builder)} takes {list(signature.parameters)})'
    return None
