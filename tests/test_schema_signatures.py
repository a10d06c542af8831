"""``yamls/schema.yaml`` against the constructors its sections feed, so the two cannot drift apart.

For every section (model, LoRA, each algorithm and callback, datasets, optimizer, scheduler, loggers, trainer):
the schema's keys are the constructors' parameters, except the ones listed below with the reason the builders fill
them in or consume them; a default the schema states in a comment (``default=<value>``) is the signature's default; a
key whose range lives in :data:`senseflow_algos.limits.RULES` has no range in the schema, and its default is in range.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import yamale
import yaml
from yamale.validators import Enum, Include, Map

from senseflow_algos.config import DEFAULT_OPTIMIZER, DEFAULT_SCHEMA, DEFAULT_SEED
from senseflow_algos.limits import RULES

SCHEMA = yamale.make_schema(str(DEFAULT_SCHEMA))
#: Defaults of keys no constructor takes (the builders read them): (include, or '' for the top level; key) -> value.
BUILDER_DEFAULTS = {('', 'seed'): DEFAULT_SEED, ('optimizer', 'kind'): DEFAULT_OPTIMIZER}
RUN_SEED = 'the run seed (top-level seed)'


def registries() -> dict[str, dict[str, Callable]]:
    """``algorithms`` / ``callbacks`` / ``dataset`` (kind) -> {key: constructor}, from the builders' registries (a
    lazily registered plugin's module, e.g. the shapes world's, is imported on lookup)."""
    from senseflow_algos import builders

    return {'algorithms': dict(builders.ALGORITHMS), 'callbacks': dict(builders.CALLBACKS),
            'dataset': dict(builders.DATASETS)}


@dataclass
class Section:
    """A schema include and what consumes it."""
    include: str
    takes: tuple[Callable, ...] = ()     # each named parameter is a key (unless ``provided``)
    forwards: tuple[Callable, ...] = ()  # reached through **kwargs: the schema may offer a subset of these
    provided: dict[str, str] = field(default_factory=dict)  # parameter -> who passes it instead of the YAML
    consumed: dict[str, str] = field(default_factory=dict)  # key -> the builder that reads it itself


def _params(fn: Callable) -> set[str]:
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind not in skip and n != 'self'}


def sections() -> list[Section]:
    import torch
    from composer import Trainer
    from composer.loggers import WandBLogger
    from streaming import Stream

    from senseflow_algos.builders import SCHEDULERS
    from senseflow_algos.models.dmd import DMDModel
    from senseflow_algos.models.factory import build_dmd_model
    from senseflow_algos.models.lora import apply_lora
    from senseflow_algos.optim import PhasedAdamW

    reg = registries()
    optimizers, consumed = (PhasedAdamW,), {'kind': 'builders.build_optimizer: picks the optimizer class'}
    try:
        from senseflow_algos.optim_8bit import PhasedAdamW8bit

        optimizers += (PhasedAdamW8bit,)
    except ImportError:
        consumed['min_8bit_size'] = 'PhasedAdamW8bit (bitsandbytes is not installed here)'
    out = [
        Section('model', takes=(build_dmd_model, DMDModel),
                provided={'seed': RUN_SEED, 'transformers_on_meta': 'builders.build_trainer (lean start)',
                          'components': 'build_dmd_model loads them'}),
        Section('lora', takes=(apply_lora,), provided={'net': 'build_dmd_model (the generator)'}),
        Section('dataset', takes=tuple(dict.fromkeys(reg['dataset'].values())),
                provided={'batch_size': 'builders.build_dataloader: global_batch_size / world size',
                          'resolution': 'builders.build_dataloader: model.resolution', 'seed': RUN_SEED},
                consumed={'kind': 'builders.build_dataloader: picks the builder',
                          'global_batch_size': 'builders.build_dataloader: divided by the world size'}),
        Section('stream', forwards=(Stream,)),  # data.streaming.make_streams passes each entry to Stream
        Section('optimizer', takes=optimizers, forwards=(torch.optim.AdamW,),
                provided={'params': 'model.param_groups()', 'controller': 'the DMD model'}, consumed=consumed),
        Section('scheduler', forwards=tuple(SCHEDULERS.values()),
                consumed={'name': 'builders.build_scheduler: picks the class'}),
        Section('wandb', forwards=(WandBLogger,)),
        Section('trainer', forwards=(Trainer,)),
    ]
    for name in ('algorithms', 'callbacks'):
        for key, ctor in reg[name].items():
            validator = SCHEMA.includes[name].dict[key]
            if isinstance(validator, Include):
                out.append(Section(validator.include_name, takes=(ctor,)))
    return out


def _keys(include: str) -> set[str]:
    return set(SCHEMA.includes[include].dict)


def _stated_defaults() -> dict[tuple[str, str], Any]:
    """``(include or '' for the top level, key) -> value`` of every ``default=<value>`` comment of the schema."""
    out, include, headers = {}, '', False
    for line in DEFAULT_SCHEMA.read_text().splitlines():
        headers = headers or line.startswith('---')  # below it, a key at column 0 opens an include
        key = re.match(r'^( {0,2})(\w+):', line)
        if key and headers and not key[1]:
            include = key[2]
            continue
        stated = re.search(r'#.*?\bdefault=(\[[^\]]*\]|[^\s;,)]+)', line)
        if key and stated:
            out[(include if key[1] else '', key[2])] = yaml.safe_load(stated[1])
    return out


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _signature_default(section: Section, key: str) -> Any:
    for fn in (*section.takes, *section.forwards):
        p = inspect.signature(fn).parameters.get(key)
        if p is not None and p.default is not inspect.Parameter.empty:
            return _normal(p.default)
    raise AssertionError(f'{section.include}.{key}: the schema states a default, but no constructor has one')


@pytest.mark.parametrize('section', sections(), ids=lambda s: s.include)
def test_schema_keys_are_constructor_parameters(section):
    takes = set().union(*map(_params, section.takes))
    forwards = set().union(*map(_params, section.forwards))
    keys = _keys(section.include)
    assert set(section.provided) <= takes | forwards, f'{section.include}: stale provided {section.provided}'
    missing = takes - set(section.provided) - keys
    assert not missing, f'schema {section.include}: has no key for constructor parameters {sorted(missing)}'
    extra = keys - takes - forwards - set(section.consumed)
    assert not extra, f'schema {section.include}: keys {sorted(extra)} are parameters of no constructor'


@pytest.mark.parametrize('name', ['algorithms', 'callbacks'])
def test_schema_names_every_registry_entry(name):
    reg = registries()[name]
    assert set(_keys(name)) == set(reg), f'schema {name} vs builders registry'
    for key, validator in SCHEMA.includes[name].dict.items():
        if isinstance(validator, Map):  # passed through untyped: only for classes the project does not own
            assert not reg[key].__module__.startswith('senseflow_algos'), f'{name}.{key}: give it an include'


def test_dataset_kinds_live_in_the_registry_only():
    """The schema types ``dataset.kind`` as a string and restates no list of kinds: the registry is the one list
    (config.py checks the name against it; tests/test_registry.py checks that check)."""
    kind = SCHEMA.includes['dataset'].dict['kind']
    assert not isinstance(kind, Enum) and type(kind).__name__ == 'String'
    assert {'synthetic', 'shapes', 'image_caption', 'precomputed', 'prompts'} <= set(registries()['dataset'])


def test_stated_defaults_are_the_signatures():
    by_include = {s.include: s for s in sections()}
    stated = _stated_defaults()
    assert len(stated) >= 10, 'the default=<value> comments were not found'
    for (include, key), value in stated.items():
        if (include, key) in BUILDER_DEFAULTS:
            assert value == BUILDER_DEFAULTS[include, key], f'schema {include}.{key}: default={value!r}'
            continue
        assert include in by_include, f'{include}.{key}: default stated for a section no test knows'
        assert _signature_default(by_include[include], key) == value, (
            f'schema {include}.{key}: default={value!r} but the signature says '
            f'{_signature_default(by_include[include], key)!r}')


def _validator(path: str) -> tuple[str, Any]:
    """``(include, validator)`` of a dotted config path, following the schema's includes."""
    node, include = SCHEMA.dict, ''
    *parents, key = path.split('.')
    for part in parents:
        validator = node[part]
        assert isinstance(validator, Include), f'{path}: {part} is not a section of the schema'
        include, node = validator.include_name, SCHEMA.includes[validator.include_name].dict
    return include, node[key]


def _choices() -> dict[str, Any]:
    from senseflow_algos.builders import SCHEDULERS
    from senseflow_algos.dtypes import DTYPES
    from senseflow_algos.models.families import FAMILIES
    from senseflow_algos.sampling import METHODS

    return {'model.family': FAMILIES, 'model.dtype': DTYPES, 'model.teacher_dtype': DTYPES,
            'model.encoder_dtype': DTYPES, 'callbacks.export_pipeline.dtype': DTYPES,
            'callbacks.export_pipeline.method': METHODS, 'callbacks.sample_grid.method': METHODS,
            'scheduler.name': SCHEDULERS}


@pytest.mark.parametrize('path', sorted(_choices()))
def test_schema_choices_are_the_code_tables(path):
    include, validator = _validator(path)
    assert isinstance(validator, Enum) and set(validator.args) == set(_choices()[path]), f'schema {path}'


@pytest.mark.parametrize('path', sorted(RULES))
def test_ranges_live_in_limits_only(path):
    include, validator = _validator(path)
    key = path.rsplit('.', 1)[1]
    inner = getattr(validator, 'validators', [])  # a list's item validators
    restated = isinstance(validator, Enum) or any({'min', 'max'} & set(v.kwargs) for v in [validator, *inner])
    assert not restated, f'schema {include}.{key} restates the range of limits.RULES[{path!r}]: {validator!r}'
    section = {s.include: s for s in sections()}.get(include)
    if section is not None:
        default = _signature_default(section, key)
        out_of_range = default is not None and RULES[path].problem(default)  # None: the class picks one
        assert not out_of_range, f'{path}: the default {default!r} {out_of_range}'
