"""The DMD model's transformers and their repeated blocks: one definition for FSDP's per-block wrapping, the lean
start, per-block compile and the planner's activation-checkpointing units."""

from __future__ import annotations

from torch import nn

__all__ = ['TRANSFORMER_NETWORKS', 'transformer_blocks']

#: The children of :class:`~senseflow_algos.models.DMDModel` that are diffusers transformers.
TRANSFORMER_NETWORKS = ('generator', 'fake_score', 'teacher')


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers FLUX or SD3 transformer (``transformer_blocks``, then
    ``single_transformer_blocks``); empty for a network without them."""
    return [m for attr in ('transformer_blocks', 'single_transformer_blocks') for m in getattr(net, attr, [])]
