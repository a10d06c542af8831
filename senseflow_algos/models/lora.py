"""LoRA for the generator and the fake score (peft): train low-rank adapters instead of all weights.

With LoRA only the adapters are trainable, so the optimizer holds states for them alone and IDA aligns the fake
score's adapters to the generator's (it lerps trainable tensors only). The adapters are fp32 master weights whatever
the base's dtype (diffusers' ``add_adapter`` creates them in the base dtype; a bf16 adapter would round small Adam
steps away), and peft casts the layer input to the adapter's dtype and the sum back to the base's. Both networks start from the same base
weights with zero-initialised adapter outputs, i.e. exactly the teacher (FLUX: without guidance embedding).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from senseflow_algos import limits

__all__ = ['apply_lora', 'DEFAULT_LORA_TARGETS']

#: Attention projections of FLUX and SD3 blocks (image and text streams).
DEFAULT_LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out')


def apply_lora(net: nn.Module, rank: int = 64, alpha: Optional[float] = None,
               target_modules: Sequence[str] = DEFAULT_LORA_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Freeze ``net`` and add a trainable LoRA adapter (in place; returns ``net``).

    Args:
        net: A diffusers transformer (FLUX or SD3).
        rank (int): Adapter rank. Default: ``64``.
        alpha (float, optional): LoRA alpha (scale ``alpha / rank``). Default: ``rank``.
        target_modules (Sequence[str]): Names of the linear layers to adapt.
        dropout (float): Adapter dropout. Default: ``0.0``.
    """
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError('model.lora needs peft: pip install -e ".[lora]"') from e
    limits.check('model.lora.rank', rank)
    net.requires_grad_(False)
    try:
        net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules),
                                   lora_dropout=dropout))
    except ValueError as e:
        raise ValueError(f'model.lora.target_modules={list(target_modules)} does not fit {type(net).__name__}: {e}') \
            from None
    for param in net.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    return net
