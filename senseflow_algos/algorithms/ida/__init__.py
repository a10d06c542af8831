"""Implicit Distribution Alignment: pull the fake score toward the generator after each generator step.

See the :doc:`README <README>` for usage and suggested hyperparameters.
"""

from senseflow_algos.algorithms.ida.ida import ImplicitDistributionAlignment, align_fake_score

__all__ = ['ImplicitDistributionAlignment', 'align_fake_score']
