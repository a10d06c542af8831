"""Implicit Distribution Alignment (IDA): after each generator step, pull the fake score toward the generator."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from senseflow_algos import limits
from senseflow_algos.algorithms.utils import get_dmd_model
from senseflow_algos.optim import TrainingPhase
from senseflow_algos.stochastic_rounding import (
    DeviceRngs,
    copy_stochastic_,
    draw_seed,
    is_low_precision,
    local_tensor,
)

log = logging.getLogger(__name__)

__all__ = ['align_fake_score', 'ImplicitDistributionAlignment']


def _matched_parameters(fake_score: nn.Module, generator: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Trainable fake-score tensors and the same-named generator tensors; a clear error on any mismatch."""
    generator_params = dict(generator.named_parameters())
    dst, src, problems = [], [], []
    for name, phi in fake_score.named_parameters():
        if not phi.requires_grad:
            continue
        theta = generator_params.get(name)
        if theta is None:
            problems.append(f'{name}: missing in the generator')
        elif theta.shape != phi.shape:
            problems.append(f'{name}: fake score {tuple(phi.shape)} vs generator {tuple(theta.shape)}')
        else:
            dst.append(phi)
            src.append(theta)
    if problems:
        shown = '\n  '.join(problems[:10]) + (f'\n  ... and {len(problems) - 10} more' if len(problems) > 10 else '')
        raise ValueError('IDA needs generator and fake score with the same parameter names and shapes:\n  ' + shown)
    return dst, src


def _reshard(module: nn.Module) -> None:
    """Put FSDP2 modules back to their sharded parameters (an FSDP2 root stays unsharded after a forward without
    backward, e.g. ISG's no-grad generator step), so both networks present the same shards to the lerp."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def align_fake_score(fake_score: nn.Module, generator: nn.Module, lam: float = 0.97,
                     rounding: Optional[torch.Generator] = None) -> None:
    """``phi <- lam * phi + (1 - lam) * theta`` for every trainable fake-score tensor ``phi``.

    ``theta`` is the generator tensor of the same name. The update is in place and tensor-local: under FSDP (both
    networks wrapped identically) each rank lerps its own shards, with no gather (and no copy of fp32 tensors). A bf16/fp16
    ``phi`` is lerped in fp32 and written back with stochastic rounding: a round-to-nearest lerp would drop every
    move smaller than half a bf16 spacing (``(1 - lam) * |theta - phi|`` is often below it), while a stochastically
    rounded one moves ``phi`` by the exact amount in expectation.

    Args:
        fake_score (nn.Module): The network updated in place.
        generator (nn.Module): The network it is pulled toward (unchanged).
        lam (float): Weight kept on the fake score, in [0, 1]. Default: ``0.97``.
        rounding (torch.Generator, optional): Source of the rounding bits for low-precision tensors (the trainer
            passes the DMD model's per-batch stream, so a resumed run rounds identically). Default: torch's global
            generator.

    Example:
        .. code-block:: python

            from senseflow_algos.functional import align_fake_score
            align_fake_score(model.fake_score, model.generator, lam=0.97)
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f'IDA lam must be in [0, 1], got {lam}')
    _reshard(fake_score)
    _reshard(generator)
    dst, src = _matched_parameters(fake_score, generator)
    exact = [(d, s) for d, s in zip(dst, src) if not is_low_precision(d)]
    if exact:
        torch._foreach_lerp_([d for d, _ in exact], [s.to(d.dtype) for d, s in exact], 1.0 - lam)
    low = [(d, s) for d, s in zip(dst, src) if is_low_precision(d)]
    if low:
        rngs = DeviceRngs(draw_seed(rounding))
        for d, s in low:
            phi = local_tensor(d).float().lerp_(local_tensor(s).float(), 1.0 - lam)
            copy_stochastic_(d, phi, rngs(phi.device))


class ImplicitDistributionAlignment(Algorithm):
    """Align the fake score to the generator after every generator optimizer step (SenseFlow, section 3.1).

    Runs at ``Event.BEFORE_TRAIN_BATCH`` of the critic phase that follows a generator step, so the fake score's
    own update of that batch starts from the aligned weights. Batches without a generator step are untouched.

    Args:
        lam (float): Weight kept on the fake score. Default: ``0.97`` (FLUX, SD 3.5 Large; 0.98 for SD 3.5 Medium).

    Example:
        .. code-block:: python

            from senseflow_algos.algorithms import ImplicitDistributionAlignment
            trainer = Trainer(model=dmd_model, algorithms=[ImplicitDistributionAlignment(lam=0.97)], ...)
    """

    def __init__(self, lam: float = 0.97):
        self.lam = limits.check('algorithms.ida.lam', lam)
        self.num_updates = 0

    def __repr__(self) -> str:
        return f'ImplicitDistributionAlignment(lam={self.lam})'

    def match(self, event: Event, state: State) -> bool:
        if event == Event.INIT:
            return True
        if event != Event.BEFORE_TRAIN_BATCH:
            return False
        model = get_dmd_model(state, 'IDA')
        return model.phase is TrainingPhase.CRITIC and model.generator_stepped

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        model = get_dmd_model(state, 'IDA')
        if event == Event.INIT:
            _matched_parameters(model.fake_score, model.generator)  # fail at start-up, not after the first step
            return None
        align_fake_score(model.fake_score, model.generator, self.lam, rounding=model.rng('ida_rounding', per_rank=False))
        self.num_updates += 1
        logger.log_metrics({'ida/num_updates': self.num_updates})
        return None

    def state_dict(self) -> dict:
        return {**super().state_dict(), 'num_updates': self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state.get('num_updates', 0))
