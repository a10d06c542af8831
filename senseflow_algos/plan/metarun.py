"""Run one network pass on meta tensors and measure it: FLOPs (``FlopCounterMode``) and the bytes autograd saves for
backward (``saved_tensors_hooks``), attributed to the submodules activation checkpointing would wrap.

Meta tensors carry shapes and dtypes but no data, so a 12B forward and backward costs seconds. Two things differ from
a GPU run and are handled here:

* attention: on meta, ``scaled_dot_product_attention`` falls back to the math path (it would save the full attention
  matrix). GPUs run flash / memory-efficient kernels, which save ``q, k, v``, the output and one fp32 log-sum-exp per
  row, and recompute the scores in backward. :func:`flash_like_sdpa` makes meta attention save exactly that and count
  the FLOPs torch's ``FlopCounterMode`` assigns to those kernels (forward: 2 matmuls; backward: 5, the recompute
  included).
* spectral norm's power iteration (VFM heads) runs under ``no_grad`` and only updates two vectors; it is skipped on
  meta, where it is slow (the normalised weight, which is saved for backward, is still computed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['PassCost', 'measure_pass', 'flash_like_sdpa', 'storage_key']


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views of one storage share it; also on the meta device)."""
    return t.untyped_storage()._cdata


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class _FlashAttention(torch.autograd.Function):
    """Attention that saves what flash attention saves and does the matmuls its kernels count."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        with torch.no_grad():
            out = _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                 **({'enable_gqa': enable_gqa} if enable_gqa else {}))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # per-row log-sum-exp
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        kt = k.transpose(-1, -2)
        scores = torch.matmul(q, kt)  # recompute
        grad_scores = torch.matmul(grad_out, v.transpose(-1, -2))
        grad_v = torch.matmul(scores.transpose(-1, -2), grad_out)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None, None, None


_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **({'enable_gqa': enable_gqa} if enable_gqa else {}))
    return _FlashAttention.apply(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@contextlib.contextmanager
def flash_like_sdpa() -> Iterator[None]:
    """Inside the block, ``F.scaled_dot_product_attention`` saves and counts like GPU flash attention."""
    from torch.nn.utils import parametrizations

    original_power = parametrizations._SpectralNorm._power_method
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    parametrizations._SpectralNorm._power_method = lambda self, weight_mat, n_power_iterations: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _ORIGINAL_SDPA
        parametrizations._SpectralNorm._power_method = original_power


@dataclass
class PassCost:
    """One measured pass of a network.

    Attributes:
        forward_flops: FLOPs of the forward.
        backward_flops: FLOPs of the backward (0 for a forward-only pass).
        unit_forward_flops: Forward FLOPs inside the checkpointable units (what recomputation adds once per backward).
        saved: Bytes autograd keeps for backward without checkpointing (parameters excluded; storages counted once).
        saved_checkpointed: Bytes kept with every unit checkpointed: tensors saved outside the units plus each unit's
            inputs.
        unit_working: Largest extra bytes one unit saves while it is recomputed in backward.
    """
    forward_flops: int = 0
    backward_flops: int = 0
    unit_forward_flops: int = 0
    saved: int = 0
    saved_checkpointed: int = 0
    unit_working: int = 0
    units: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops

    def scaled(self, k: float) -> 'PassCost':
        """This pass ``k`` times (FLOPs only)."""
        return PassCost(int(self.forward_flops * k), int(self.backward_flops * k), int(self.unit_forward_flops * k))


def _tensors(obj) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def measure_pass(fn: Callable[[], torch.Tensor], backward: bool, exclude: Iterable[torch.Tensor] = (),
                 units: Iterable[nn.Module] = ()) -> PassCost:
    """Run ``fn`` (forward, returning a tensor) and, if ``backward``, backpropagate its sum; measure both.

    Args:
        fn: The forward pass; its inputs and modules live on the meta device.
        backward: Backpropagate ``fn()``'s sum (gradients reach whatever requires grad).
        exclude: Tensors whose storages do not count as saved activations (parameters, buffers).
        units: Submodules activation checkpointing would wrap (their inputs and internals are tracked).
    """
    excluded = {storage_key(t) for t in exclude}
    units = list(units)
    outside: dict[int, int] = {}
    inside: list[dict[int, int]] = [dict() for _ in units]
    inputs: dict[int, int] = {}
    active: list[int] = []
    unit_flops = [0]
    alive: list[torch.Tensor] = []  # recorded tensors stay referenced: a freed storage's address could be reused
    forward_counter = FlopCounterMode(display=False)
    starts: list[int] = []

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in excluded:
            (inside[active[-1]] if active else outside)[key] = _storage_bytes(t)
            alive.append(t)
        return t

    def pre_hook(index):
        def hook(module, args, kwargs):
            for t in _tensors((args, kwargs)):
                if storage_key(t) not in excluded:
                    inputs[storage_key(t)] = _storage_bytes(t)
                    alive.append(t)
            active.append(index)
            starts.append(forward_counter.get_total_flops())
        return hook

    def post_hook(module, args, kwargs, output):
        active.pop()
        unit_flops[0] += forward_counter.get_total_flops() - starts.pop()

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(unit.register_forward_hook(post_hook, with_kwargs=True))
    cost = PassCost(units=len(units))
    try:
        with flash_like_sdpa():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), forward_counter:
                out = fn()
            cost.forward_flops = forward_counter.get_total_flops()
            if backward:
                with FlopCounterMode(display=False) as backward_counter:
                    out.float().sum().backward()
                cost.backward_flops = backward_counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()
    cost.unit_forward_flops = unit_flops[0]
    all_inside = {k: v for d in inside for k, v in d.items()}
    cost.saved = sum({**outside, **all_inside}.values())
    kept = {**outside, **inputs}  # a checkpointed unit keeps its inputs alive until its backward
    cost.saved_checkpointed = sum(kept.values())
    cost.unit_working = max((sum(v for k, v in d.items() if k not in kept) for d in inside), default=0)
    return cost
