"""The DMD model's denoising networks and their repeated blocks: one definition for FSDP's per-block wrapping, the
lean start, per-block compile and the planner's activation-checkpointing units."""

from __future__ import annotations

from torch import nn

__all__ = ['TRANSFORMER_NETWORKS', 'transformer_blocks']

#: The children of :class:`~senseflow_algos.models.DMDModel` that are diffusers denoisers (transformers or UNets).
TRANSFORMER_NETWORKS = ('generator', 'fake_score', 'teacher')

#: Attributes holding a network's repeated blocks, in forward order: FLUX / SD3 transformers, then UNets.
_TRANSFORMER_BLOCKS = ('transformer_blocks', 'single_transformer_blocks')
_UNET_BLOCKS = ('down_blocks', 'mid_block', 'up_blocks')


def _children(net: nn.Module, attrs: tuple[str, ...]) -> list[nn.Module]:
    blocks = []
    for attr in attrs:
        value = getattr(net, attr, None)
        if isinstance(value, nn.ModuleList):
            blocks.extend(value)
        elif isinstance(value, nn.Module):  # a UNet's single mid_block
            blocks.append(value)
    return blocks


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers denoiser: a FLUX or SD3 transformer's ``transformer_blocks`` then
    ``single_transformer_blocks``; else a UNet's ``down_blocks``, ``mid_block`` and ``up_blocks`` (SDXL); empty for a
    network with neither."""
    return _children(net, _TRANSFORMER_BLOCKS) or _children(net, _UNET_BLOCKS)
