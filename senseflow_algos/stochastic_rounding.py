"""Stochastic rounding of fp32 values to bf16 / fp16: small updates survive low-precision weights in expectation.

Round-to-nearest drops every update smaller than half the spacing of the target format: a bf16 weight of magnitude
0.02 has neighbours 2**-13 (1.2e-4) apart, so an AdamW step of lr 1e-5 never changes it. Stochastic rounding picks
the upper neighbour with probability ``(x - lo) / (hi - lo)`` and the lower one otherwise, so the rounded value equals
``x`` in expectation and many small steps add up to the right total.

For bf16 (the upper 16 bits of an fp32) this is done on the bit pattern: add 16 uniform random bits to the fp32 bits
and truncate the low 16. The sign-magnitude layout makes the carry move the magnitude up to the next bf16 value with
exactly the probability ``low 16 bits / 2**16``, also across a change of exponent. fp16 has a narrower exponent, so
its far neighbour is one step of the fp16 bit pattern and the choice is a uniform draw against the distance. The
random bits come from a caller's :class:`torch.Generator`, so a run that reseeds it the same way rounds the same way.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ['LOW_PRECISION_DTYPES', 'is_low_precision', 'stochastic_round', 'copy_stochastic_', 'local_tensor',
           'draw_seed', 'DeviceRngs']

#: Parameter dtypes whose updates need stochastic rounding to keep small steps.
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)

_LOW_16 = 0xFFFF
_HIGH_16 = -65536  # 0xFFFF0000 as an int32


def is_low_precision(t: torch.Tensor) -> bool:
    """Whether ``t`` is bf16 or fp16."""
    return t.dtype in LOW_PRECISION_DTYPES


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of an FSDP2 ``DTensor`` (a view that writes through), else ``t``."""
    to_local = getattr(t, 'to_local', None)
    return to_local() if to_local is not None else t


def draw_seed(source: Optional[torch.Generator] = None) -> int:
    """One 62-bit seed from ``source`` (torch's global generator if ``None``)."""
    device = source.device if source is not None else 'cpu'
    return int(torch.randint(0, 2**62, (), generator=source, device=device))


class DeviceRngs:
    """Random streams (``torch.Generator``) seeded with ``seed``, one per device, made on first use.

    Random bits are drawn on each tensor's own device (parameters may sit on the GPU or, offloaded, on the CPU while
    the caller's stream lives elsewhere); tensors visited in the same order get the same bits.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._rngs: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._rngs:
            rng = torch.Generator(device=device)
            rng.manual_seed(self.seed)
            self._rngs[device] = rng
        return self._rngs[device]


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round ``x`` to ``dtype`` (bf16 or fp16), up or down with probabilities given by the distance to each neighbour.

    Args:
        x (torch.Tensor): Values (computed in fp32; other float dtypes are converted to fp32 first).
        dtype (torch.dtype): ``torch.bfloat16`` or ``torch.float16``.
        rng (torch.Generator, optional): Source of the random bits, on ``x``'s device. Default: torch's global
            generator.

    Returns:
        A tensor of ``dtype`` with ``E[result] == x`` for finite ``x`` within the target range. Values exactly
        representable in ``dtype`` are returned unchanged; NaN and Inf are passed through.
    """
    x = x.float()
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32)
        noise = torch.randint(0, _LOW_16 + 1, x.shape, dtype=torch.int32, device=x.device, generator=rng)
        rounded = ((bits + noise) & _HIGH_16).view(torch.float32)
        # A NaN's payload plus noise could carry into the sign bit; non-finite values keep their nearest rounding.
        return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)
    if dtype == torch.float16:
        near = x.to(torch.float16)
        gap = x - near.float()
        # The fp16 neighbour on the far side of x: one step of the int16 bit pattern, up in magnitude when x lies
        # farther from zero than its nearest value, down otherwise (a zero takes the sign of the gap first).
        bits = near.view(torch.int16)
        bits = torch.where(near == 0, torch.where(gap < 0, torch.full_like(bits, -32768), torch.zeros_like(bits)), bits)
        outward = (gap > 0) == (bits >= 0)
        away = torch.where(outward, bits + 1, bits - 1).view(torch.float16)
        # P(away) = |gap| / spacing; gap == 0 (exact values) never moves.
        prob = gap.abs() / (away.float() - near.float()).abs()
        u = torch.rand(x.shape, dtype=torch.float32, device=x.device, generator=rng)
        out = torch.where(u < prob, away, near)
        return torch.where(torch.isfinite(near) & torch.isfinite(x), out, near)
    raise ValueError(f'stochastic rounding targets bfloat16 or float16, got {dtype}')


@torch.no_grad()
def copy_stochastic_(dst: torch.Tensor, src: torch.Tensor, rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Write fp32 ``src`` into low-precision ``dst`` in place, stochastically rounded (a plain copy for other dtypes).

    ``dst`` may be a parameter, an FSDP1 flat-parameter view or an FSDP2 ``DTensor`` (its local shard is written;
    ``src`` is then the matching local fp32 values).
    """
    target = local_tensor(dst)
    src = local_tensor(src)
    if is_low_precision(target):
        target.copy_(stochastic_round(src, target.dtype, rng))
    else:
        target.copy_(src)
    return dst
