"""Functional forms of the SenseFlow algorithms, usable without the Composer ``Trainer``."""

from senseflow_algos.algorithms.ida import align_fake_score
from senseflow_algos.algorithms.isg import isg_loss, isg_target
from senseflow_algos.algorithms.vfm_discriminator import (
                                                           diff_augment,
                                                           discriminator_logits,
                                                           hinge_d_loss,
                                                           hinge_g_loss,
                                                           reference_features,
)

__all__ = [
    'align_fake_score', 'isg_loss', 'isg_target', 'diff_augment', 'discriminator_logits', 'hinge_d_loss',
    'hinge_g_loss',
    'reference_features'
]
