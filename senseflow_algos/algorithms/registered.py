"""Registers the SenseFlow algorithms under their ``algorithms:`` names (imported on first lookup, see
:mod:`senseflow_algos.registry`)."""

from senseflow_algos.algorithms.ida import ImplicitDistributionAlignment
from senseflow_algos.algorithms.isg import IntraSegmentGuidance
from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator
from senseflow_algos.registry import ALGORITHMS

__all__: list[str] = []

ALGORITHMS.register('ida', ImplicitDistributionAlignment)
ALGORITHMS.register('isg', IntraSegmentGuidance)
ALGORITHMS.register('vfm_discriminator', VFMDiscriminator)
