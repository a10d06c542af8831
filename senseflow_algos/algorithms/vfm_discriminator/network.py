"""Networks of the VFM (vision-foundation-model) discriminator, method notes §4: the backbone
(:mod:`~senseflow_algos.algorithms.vfm_discriminator.backbone`) and the heads
(:mod:`~senseflow_algos.algorithms.vfm_discriminator.heads`), re-exported here under the names they always had.

* :class:`VFMBackbone`: a frozen timm ViT (DINOv2 ViT-L/14 by default) that turns images in ``[-1, 1]`` into a list
  of 2-D feature maps (the embedding output plus chosen block outputs, CLS token added to every patch token).
  Gradients flow through it to the image; none of its parameters train.
* :class:`DiscriminatorHead`: a small spectral-norm conv head on one feature map, conditioned on a text embedding
  and on the same backbone's features of a reference image (added per location, as the released code does, or
  pooled to one vector); emits one logit per output location.
* :class:`VFMDiscriminatorHeads`: one head per feature map, logits concatenated to ``(B, N)``.

Only the heads are optimised (§4.4). The hinge losses live in
:mod:`senseflow_algos.algorithms.vfm_discriminator.losses` and the augmentation in
:mod:`senseflow_algos.algorithms.vfm_discriminator.diffaug`.
"""

from senseflow_algos.algorithms.vfm_discriminator.backbone import (
    DEFAULT_VFM_MODEL,
    DINOV2_VITL_BLOCK_INDICES,
    VFMBackbone,
    default_block_indices,
)
from senseflow_algos.algorithms.vfm_discriminator.heads import (
    DEFAULT_REFERENCE_MAP,
    REFERENCE_MAPS,
    BatchNormLocal,
    DiscriminatorHead,
    VFMDiscriminatorHeads,
    fitting_downsamples,
)

__all__ = [
    'DEFAULT_VFM_MODEL',
    'REFERENCE_MAPS',
    'DEFAULT_REFERENCE_MAP',
    'fitting_downsamples',
    'DINOV2_VITL_BLOCK_INDICES',
    'default_block_indices',
    'VFMBackbone',
    'BatchNormLocal',
    'DiscriminatorHead',
    'VFMDiscriminatorHeads',
]
