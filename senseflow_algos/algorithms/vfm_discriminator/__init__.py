"""VFM discriminator: hinge GAN with trainable heads on a frozen vision foundation model (DINOv2).

See the :doc:`README <README>` for usage and suggested hyperparameters.
"""

from senseflow_algos.algorithms.vfm_discriminator.backbone import DEFAULT_VFM_MODEL, VFMBackbone
from senseflow_algos.algorithms.vfm_discriminator.diffaug import diff_augment
from senseflow_algos.algorithms.vfm_discriminator.heads import DiscriminatorHead, VFMDiscriminatorHeads
from senseflow_algos.algorithms.vfm_discriminator.losses import hinge_d_loss, hinge_g_loss
from senseflow_algos.algorithms.vfm_discriminator.vfm_discriminator import (
                                                                   VFMDiscriminator,
                                                                   discriminator_logits,
                                                                   enable_decoder_checkpointing,
                                                                   reference_features,
)

__all__ = [
    'VFMDiscriminator', 'discriminator_logits', 'reference_features', 'diff_augment', 'hinge_d_loss', 'hinge_g_loss', 'VFMBackbone',
    'VFMDiscriminatorHeads', 'DiscriminatorHead', 'DEFAULT_VFM_MODEL', 'enable_decoder_checkpointing'
]
