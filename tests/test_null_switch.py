"""``name: null`` switches any named algorithm, callback or logger off; ``name: {}`` keeps it with its defaults
(``section.name=null`` / ``section.name={}`` on the command line)."""

from __future__ import annotations

import pytest

from tests.conftest import YAMLS


def _cfg(yaml_name: str, overrides=()):
    from senseflow_algos.config import load_config, validate_config

    path = YAMLS / f'{yaml_name}.yaml'
    cfg = load_config(path, list(overrides))
    validate_config(cfg, source=str(path))  # the schema accepts null and {} for every named entry
    return cfg


def _names(objects) -> list[str]:
    return [type(o).__name__ for o in objects]


def test_null_switches_shapes_callbacks_off():
    """The issue's command line: the demo's report and export are off; the rest of the section stays."""
    from senseflow_algos.builders import build_callbacks

    cfg = _cfg('shapes', ['callbacks.shapes_report=null', 'callbacks.export_pipeline=null'])
    assert cfg['callbacks']['shapes_report'] is None and cfg['callbacks']['export_pipeline'] is None
    assert _names(build_callbacks(cfg['callbacks'])) == ['SpeedMonitor']


def test_empty_mapping_keeps_a_callback_with_its_defaults():
    from senseflow_algos.builders import build_callbacks
    from senseflow_algos.callbacks import ExportPipeline, SampleGrid

    cfg = _cfg('shapes', ['callbacks.shapes_report=null', 'callbacks.sample_grid={}'])
    callbacks = build_callbacks(cfg['callbacks'])
    assert _names(callbacks) == ['SpeedMonitor', 'ExportPipeline', 'SampleGrid']
    export = next(c for c in callbacks if isinstance(c, ExportPipeline))
    grid = next(c for c in callbacks if isinstance(c, SampleGrid))
    assert (export.folder, export.method, export.dtype, export.bare) == (None, 'renoise', None, True)
    assert (grid.every_n_batches, grid.method, grid.seed) == (500, 'renoise', 0)


def test_null_switches_an_algorithm_off():
    from senseflow_algos.builders import build_algorithms

    cfg = _cfg('tiny_flux', ['algorithms.isg=null'])
    assert _names(build_algorithms(cfg['algorithms'])) == ['ImplicitDistributionAlignment', 'VFMDiscriminator']


@pytest.mark.parametrize('section', ['algorithms', 'callbacks', 'loggers'])
def test_null_section_is_empty(section):
    from senseflow_algos.builders import build_algorithms, build_callbacks, build_loggers

    cfg = _cfg('tiny_flux', [f'{section}=null'])
    built = {
        'algorithms': lambda: build_algorithms(cfg.get('algorithms')),
        'callbacks': lambda: build_callbacks(cfg.get('callbacks')),
        'loggers': lambda: build_loggers(cfg.get('loggers'), cfg),
    }[section]()
    assert built == []


def test_null_switches_a_logger_off_and_empty_mapping_keeps_it():
    from composer.loggers import WandBLogger

    from senseflow_algos.builders import build_loggers

    off = _cfg('tiny_flux', ['loggers.wandb=null'])
    assert off['loggers'] == {'wandb': None}
    assert build_loggers(off['loggers'], off) == []
    on = _cfg('tiny_flux', ['loggers.wandb={}'])
    loggers = build_loggers(on['loggers'], on)
    assert len(loggers) == 1 and isinstance(loggers[0], WandBLogger)


def test_built_trainer_has_only_the_switched_on_entries(make_trainer):
    """The real tiny config through ``build_trainer``: null entries of all three sections are absent from the
    Trainer, a ``{}`` entry is present."""
    from composer.callbacks import SpeedMonitor
    from composer.loggers import WandBLogger

    from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator
    from senseflow_algos.callbacks import ExportPipeline

    trainer, _ = make_trainer('tiny_flux', [
        'callbacks.speed_monitor=null', 'callbacks.export_pipeline={}', 'algorithms.vfm_discriminator=null',
        'loggers.wandb=null'
    ])
    callbacks = trainer.state.callbacks
    assert not any(isinstance(c, SpeedMonitor) for c in callbacks)
    assert sum(isinstance(c, ExportPipeline) for c in callbacks) == 1
    assert _names(trainer.state.algorithms) == ['ImplicitDistributionAlignment', 'IntraSegmentGuidance']
    assert not any(isinstance(a, VFMDiscriminator) for a in trainer.state.algorithms)
    assert not any(isinstance(d, WandBLogger) for d in trainer.logger.destinations)
