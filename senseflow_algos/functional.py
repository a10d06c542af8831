"""Functional forms of the SenseFlow algorithms, usable without the Composer ``Trainer``."""

from senseflow_algos.algorithms.ida import align_fake_score
from senseflow_algos.algorithms.isg import isg_loss, isg_target

__all__ = ['align_fake_score', 'isg_loss', 'isg_target']
