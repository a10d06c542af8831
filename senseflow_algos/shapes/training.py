"""What the shapes-world training scripts (teacher, evaluator, VFM) share: timestamped logging, the warm-up + cosine
learning-rate factor and one optimizer update."""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

__all__ = ['log', 'warmup_cosine', 'optimizer_step']


def log(msg: str) -> None:
    """Print ``[HH:MM:SS] msg`` and flush (the scripts run for many minutes under ``nohup``)."""
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up ``(step + 1) / warmup`` for ``warmup`` steps, then a cosine from 1 down to
    ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, module: Optional[torch.nn.Module] = None,
                   max_grad_norm: Optional[float] = None) -> None:
    """Zero the gradients, back-propagate ``loss``, clip ``module``'s gradients to ``max_grad_norm`` (if given) and
    step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
    opt.step()
