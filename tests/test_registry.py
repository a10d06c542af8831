"""Registries of dataset kinds, callbacks and algorithms (issue 17 item 5): a user's plugin registers a kind and a
callback and a run YAML uses them (``plugins:``); unknown names fail naming the key and the known names; the shapes
world registers through the same public calls."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from senseflow_algos.config import ConfigError, load_config, validate_config
from senseflow_algos.registry import ALGORITHMS, CALLBACKS, DATASETS, Registry, UnknownNameError
from tests.conftest import REPO, YAMLS

PLUGIN = ['plugins=[tests.registry_plugin]', 'dataset.kind=plugin_squares', 'dataset.colour_offset=3',
          'dataset.num_samples=8', 'callbacks.plugin_batch_counter={label: seen}']


@pytest.fixture(autouse=True, scope='module')
def _forget_the_plugin():
    """The test plugin's names leave the process-wide registries with this module, so later tests (e.g.
    tests/test_schema_signatures.py, which holds the registries against the schema) see the library's names only."""
    yield
    DATASETS.unregister('plugin_squares')
    CALLBACKS.unregister('plugin_batch_counter')
    sys.modules.pop('tests.registry_plugin', None)


def _cfg(yaml_name: str, overrides=()):
    path = YAMLS / f'{yaml_name}.yaml'
    cfg = load_config(path, list(overrides))
    validate_config(cfg, source=str(path))
    return cfg


def test_registry_register_lookup_and_errors():
    reg = Registry('callbacks', entries=True)

    @reg.register('a')
    class A:
        pass

    def b():
        pass

    assert reg.register('b', b) is b and reg.register('a', A) is A  # the same builder again: a no-op
    assert reg.names() == ['a', 'b'] and 'a' in reg and reg['a'] is A and dict(reg) == {'a': A, 'b': b}
    with pytest.raises(ValueError, match="callbacks.a is already registered"):
        reg.register('a', b)
    with pytest.raises(UnknownNameError, match=r"callbacks.c is not known; choose from \['a', 'b'\]") as e:
        reg.lookup('c')
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith('callbacks.c is not known')  # not quoted like a KeyError
    kinds = Registry('dataset.kind', entries=False)
    with pytest.raises(UnknownNameError, match=r"dataset.kind='x' is not supported; choose from \[\]"):
        kinds.lookup('x')


def test_lazy_names_are_known_without_importing():
    """Validating a config needs every name but imports no torch: the library declares where its names live."""
    code = ('import sys; from senseflow_algos.registry import ALGORITHMS, CALLBACKS, DATASETS; '
            'print(DATASETS.names(), CALLBACKS.names(), ALGORITHMS.names(), "torch" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['image_caption', 'precomputed', 'prompts', 'shapes', 'synthetic'] "
                           "['export_pipeline', 'lr_monitor', 'memory_monitor', 'optimizer_monitor', "
                           "'runtime_estimator', 'sample_grid', 'shapes_report', 'speed_monitor'] "
                           "['ida', 'isg', 'vfm_discriminator'] False")


def test_builders_keep_their_registry_names():
    from senseflow_algos import builders

    assert builders.ALGORITHMS is ALGORITHMS and builders.CALLBACKS is CALLBACKS and builders.DATASETS is DATASETS
    from senseflow_algos.algorithms import IntraSegmentGuidance
    from senseflow_algos.callbacks import SampleGrid

    assert builders.ALGORITHMS['isg'] is IntraSegmentGuidance and builders.CALLBACKS['sample_grid'] is SampleGrid


def test_user_plugin_dataset_kind_and_callback_from_yaml():
    from senseflow_algos.builders import build_callbacks, build_dataloader
    from tests.registry_plugin import BatchCounter, build_plugin_squares

    cfg = _cfg('tiny_flux', PLUGIN)  # the schema knows neither name nor dataset.colour_offset: the registry does
    loader = build_dataloader(cfg['dataset'], resolution=cfg['model']['resolution'], seed=0)
    assert DATASETS['plugin_squares'] is build_plugin_squares
    assert loader.colour_offset == 3 and loader.batch_size == 2 and len(loader.dataset) == 8
    counters = [c for c in build_callbacks(cfg['callbacks']) if isinstance(c, BatchCounter)]
    assert len(counters) == 1 and counters[0].label == 'seen'


def test_user_plugin_trains(make_trainer):
    """A run YAML with the plugin's kind and callback trains (2 batches of the tiny FLUX student)."""
    trainer, _ = make_trainer('tiny_flux', [*PLUGIN, 'trainer.max_duration=2ba', 'algorithms=null',
                                            'callbacks.sample_grid=null', 'callbacks.export_pipeline=null'])
    counter = next(c for c in trainer.state.callbacks if type(c).__name__ == 'BatchCounter')
    trainer.fit()
    assert counter.batches == 2 and trainer.state.timestamp.batch.value == 2
    trainer.close()


@pytest.mark.parametrize('override, message', [
    ('dataset.kind=nope', r"dataset.kind='nope' is not supported; choose from \['image_caption', .*'precomputed', "
     r"'prompts', 'shapes', 'synthetic'\]"),
    ('callbacks.nope={}', r"callbacks.nope is not known; choose from \[.*'sample_grid', 'shapes_report', "
     r"'speed_monitor'.*\]"),
    ('algorithms.nope={}', r"algorithms.nope is not known; choose from \['ida', 'isg', 'vfm_discriminator'\]"),
    ('plugins=[no_such_plugin_module]', r"plugins\[0\]='no_such_plugin_module' cannot be imported"),
])
def test_unknown_names_name_the_key_and_the_known_names(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg('tiny_flux', [override])


def test_plugin_kwargs_are_checked_against_the_registered_signature():
    with pytest.raises(ConfigError, match=r"callbacks.plugin_batch_counter: .*unexpected keyword argument 'lable'"):
        _cfg('tiny_flux', [*PLUGIN, 'callbacks.plugin_batch_counter={lable: x}'])
    with pytest.raises(ConfigError, match=r"dataset \(kind plugin_squares\): .*unexpected keyword argument "
                                          r"'colour_ofset'.*build_plugin_squares"):
        _cfg('tiny_flux', [*PLUGIN, 'dataset.colour_ofset=1'])
    with pytest.raises(ConfigError, match=r'dataset.colour_offset: Unexpected element'):  # the library's kinds
        _cfg('tiny_flux', ['plugins=[tests.registry_plugin]', 'dataset.colour_offset=1'])


def test_builders_look_up_unknown_names_with_the_same_message():
    from senseflow_algos.builders import build_callbacks, build_dataloader

    with pytest.raises(ValueError, match=r"callbacks.nope is not known; choose from \["):
        build_callbacks({'nope': {}})
    with pytest.raises(ValueError, match=r"dataset.kind='nope' is not supported; choose from \["):
        build_dataloader({'kind': 'nope', 'global_batch_size': 2}, resolution=32, seed=0)


def test_shapes_registers_through_the_public_api():
    """No special case for the shapes world: builders never name it, and its plugin module registers its kind and
    callback with the same calls a user's plugin makes."""
    from senseflow_algos import builders
    from senseflow_algos.shapes import plugin
    from senseflow_algos.shapes.report import ShapesReport
    from senseflow_algos.shapes.world import build_shapes_dataloader

    assert 'shapes' not in inspect.getsource(builders)
    source = inspect.getsource(plugin)
    assert "DATASETS.register('shapes', build_shapes_dataloader)" in source
    assert "CALLBACKS.register('shapes_report', ShapesReport)" in source
    assert DATASETS.lookup('shapes') is build_shapes_dataloader and CALLBACKS.lookup('shapes_report') is ShapesReport
    assert DATASETS.is_lazy('shapes') and CALLBACKS.is_lazy('shapes_report')


def test_shapes_yaml_builds_its_dataloader_and_report_through_the_registry():
    from senseflow_algos.builders import build_callbacks, build_dataloader
    from senseflow_algos.shapes.report import ShapesReport

    cfg = _cfg('shapes')
    loader = build_dataloader(cfg['dataset'], resolution=cfg['model']['resolution'], seed=cfg.get('seed', 17))
    assert type(loader.dataset).__name__ == 'ShapesDataset'
    assert any(isinstance(c, ShapesReport) for c in build_callbacks(cfg['callbacks']))
