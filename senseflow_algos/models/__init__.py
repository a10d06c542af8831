"""DMD model, teacher families and model factories."""

from senseflow_algos.models.dmd import CRITIC_PHASE, GENERATOR_PHASE, DMDModel
from senseflow_algos.models.factory import build_dmd_model
from senseflow_algos.models.families import FAMILIES, Components, FluxFamily, ModelFamily, SD35Family, get_family
from senseflow_algos.models.step import GeneratorStep, TrainingPhase

__all__ = [
    'DMDModel', 'GENERATOR_PHASE', 'CRITIC_PHASE', 'GeneratorStep', 'TrainingPhase', 'build_dmd_model', 'FAMILIES', 'Components', 'FluxFamily',
    'ModelFamily', 'SD35Family', 'get_family'
]
