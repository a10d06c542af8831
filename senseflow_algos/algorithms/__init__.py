"""The SenseFlow ingredients as Composer Algorithms. In YAML: ``algorithms: {ida, isg, vfm_discriminator}``."""

from senseflow_algos.algorithms.ida import ImplicitDistributionAlignment
from senseflow_algos.algorithms.isg import IntraSegmentGuidance
from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator

__all__ = ['ImplicitDistributionAlignment', 'IntraSegmentGuidance', 'VFMDiscriminator']
