"""senseflow-composer: SenseFlow distillation (DMD + IDA + ISG + VFM discriminator) on MosaicML Composer.

Public names are imported lazily so that ``train.py`` can validate a config before torch and Composer load.
"""

from importlib import import_module
from typing import Any

__version__ = '0.1.0'

_EXPORTS = {
    'DMDModel': 'senseflow_algos.models.dmd',
    'build_dmd_model': 'senseflow_algos.models.factory',
    'ModelFamily': 'senseflow_algos.models.families',
    'FluxFamily': 'senseflow_algos.models.families',
    'SD35Family': 'senseflow_algos.models.families',
    'get_family': 'senseflow_algos.models.families',
    'PhasedAdamW': 'senseflow_algos.optim',
    'Phase': 'senseflow_algos.optim',
    'TrainingPhase': 'senseflow_algos.optim',
    'GeneratorStep': 'senseflow_algos.models.step',
    'PhasedAdamW8bit': 'senseflow_algos.optim_8bit',
    'ShapesReport': 'senseflow_algos.shapes.report',
    'flow': 'senseflow_algos.flow',
    'load_config': 'senseflow_algos.config',
    'validate_config': 'senseflow_algos.config',
    'ConfigError': 'senseflow_algos.config',
    'ImplicitDistributionAlignment': 'senseflow_algos.algorithms',
    'IntraSegmentGuidance': 'senseflow_algos.algorithms',
    'VFMDiscriminator': 'senseflow_algos.algorithms',
    'functional': 'senseflow_algos.functional',
    'sample': 'senseflow_algos.sampling',
    'export_checkpoint': 'senseflow_algos.export',
    'restore_student': 'senseflow_algos.restore',
    'CheckpointError': 'senseflow_algos.checkpointing',
    'evaluate': 'senseflow_algos.evaluation',
    'SampleGrid': 'senseflow_algos.callbacks',
    'ExportPipeline': 'senseflow_algos.callbacks',
    'build_trainer': 'senseflow_algos.builders',
    'plan_run': 'senseflow_algos.plan',
    'Hardware': 'senseflow_algos.plan',
    'format_plan': 'senseflow_algos.plan',
    'stochastic_round': 'senseflow_algos.stochastic_rounding',
    'LowPrecisionAdamW': 'senseflow_algos.optim',
    'preflight': 'senseflow_algos.preflight',
    'Registry': 'senseflow_algos.registry',
    'registry': 'senseflow_algos.registry',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    module = import_module(_EXPORTS[name])
    return module if module.__name__.endswith(f'.{name}') else getattr(module, name)
