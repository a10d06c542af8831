"""Intra-Segment Guidance (ISG): the generator's jump over a segment must match teacher-then-generator."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from senseflow_algos import flow, limits
from senseflow_algos.algorithms.utils import get_dmd_model
from senseflow_algos.models.dmd import sample_uniform
from senseflow_algos.models.step import GeneratorStep
from senseflow_algos.optim import TrainingPhase

__all__ = ['isg_target', 'isg_loss', 'mid_sigma', 'check_segments', 'IntraSegmentGuidance']

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def isg_target(teacher_velocity: VelocityFn, generator_velocity: VelocityFn, x: torch.Tensor, sigma: torch.Tensor,
               sigma_mid: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The stop-gradient ISG target: teacher Euler step ``sigma -> sigma_mid``, then generator ``sigma_mid -> next``.

    Args:
        teacher_velocity: ``(x, sigma) -> v`` of the guided teacher.
        generator_velocity: ``(x, sigma) -> v`` of the generator.
        x: Sample at the segment start, ``(B, ...)``.
        sigma, sigma_mid, sigma_next: Per-sample ``(B,)`` segment start, intermediate point and segment end.
    """
    x_mid = flow.euler_step(x, teacher_velocity(x, sigma), sigma, sigma_mid)
    return flow.euler_step(x_mid, generator_velocity(x_mid, sigma_mid), sigma_mid, sigma_next)


def isg_loss(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             target: torch.Tensor, loss_type: str = 'charbonnier', charbonnier_c: float = 1e-3) -> torch.Tensor:
    """Distance between the generator's direct Euler step ``sigma -> sigma_next`` and the ISG target.

    Gradient reaches the generator only through ``velocity`` (its forward at the segment start).

    Args:
        loss_type: ``charbonnier`` (the reference code, ``sqrt(d^2 + c^2) - c``) or ``l2`` (the paper's MSE).
    """
    direct = flow.euler_step(x.detach(), velocity, sigma, sigma_next)
    target = target.detach()
    if loss_type == 'charbonnier':
        return flow.charbonnier(direct, target, charbonnier_c)
    if loss_type == 'l2':
        return torch.nn.functional.mse_loss(direct.float(), target.float())
    raise ValueError(f"ISG loss_type must be 'charbonnier' or 'l2', got {loss_type!r}")


def mid_sigma(family, sigma_cur: torch.Tensor, sigma_next: torch.Tensor, rng: torch.Generator,
              margin: Optional[int] = None) -> torch.Tensor:
    """A random intermediate sigma inside each segment, uniform on the family's integer index grid.

    Draws ``t_mid`` uniformly in ``[t_next + m, t_cur - m]`` per sample (``m`` = ``margin``, default the family's
    ``defaults.isg_margin``; indices by its :meth:`sigma_to_index`) and maps it to sigma with :meth:`index_to_sigma`
    (method notes 3.1: uniform in index, so for SD 3.5 uniform before the shift).

    Args:
        family (ModelFamily): The teacher family.
        sigma_cur, sigma_next: Per-sample ``(B,)`` segment start and end (float64).
        rng (torch.Generator): The draw's generator.
        margin (int, optional): Index margin from both ends.
    """
    margin = family.defaults.isg_margin if margin is None else margin
    lo = family.sigma_to_index(sigma_next) + margin
    hi = family.sigma_to_index(sigma_cur) - margin
    if (hi < lo).any():
        raise ValueError(f'ISG margin {margin} leaves no room inside a segment '
                         f'(index ranges {lo.tolist()}..{hi.tolist()})')
    u = torch.rand(lo.shape, generator=rng, dtype=torch.float64, device=rng.device).to(lo.device)
    t_mid = lo + torch.floor(u * (hi - lo + 1))
    return family.index_to_sigma(t_mid)


def check_segments(family, sigmas: torch.Tensor, margin: Optional[int] = None) -> None:
    """Check that every segment ``sigmas[i] -> sigmas[i + 1]`` leaves room for ``t_mid`` inside the index margin.

    A segment from index ``t_cur`` to ``t_next`` (the family's :meth:`sigma_to_index`) needs
    ``t_next + margin <= t_cur - margin``. With few steps this always holds; with many steps, or a large margin, the
    top segments (FLUX: 1000 -> 956 for 8 steps at 1024 px) become too short.

    Args:
        family (ModelFamily): The teacher family (its index grid and default margin).
        sigmas (Tensor): Anchors followed by 0 (``DMDModel.sigmas``).
        margin (int, optional): ``algorithms.isg.margin``. Default: the family's.

    Raises:
        ValueError: Naming the first segment without room, the step count and the margin.
    """
    m = family.defaults.isg_margin if margin is None else margin
    index = family.sigma_to_index(torch.as_tensor(sigmas, dtype=torch.float64))
    for i in range(len(index) - 1):
        lo, hi = int(index[i + 1]) + m, int(index[i]) - m
        if hi < lo:
            raise ValueError(
                f'algorithms.isg.margin={m} leaves no room for ISG in segment {i} (sigma {float(sigmas[i]):.4f} -> '
                f'{float(sigmas[i + 1]):.4f}, index {int(index[i])} -> {int(index[i + 1])}) of the '
                f'{family.name} student with model.num_steps={len(index) - 1}: lower algorithms.isg.margin (at most '
                f'{(int(index[i]) - int(index[i + 1])) // 2} here) or model.num_steps')


class IntraSegmentGuidance(Algorithm):
    """Add ``weight * L_ISG`` to the generator loss on generator batches (SenseFlow, section 3.2).

    Works for any number of anchors (``model.num_steps``); :func:`check_segments` checks at ``Event.INIT`` that each
    segment is longer than twice the margin. For a sample at anchor ``tau_i``, draws ``t_mid`` uniformly on the 0..1000 index grid inside
    ``(tau_{i+1} + margin, tau_i - margin)`` (the last segment ends at sigma 0), lets the guided teacher step
    ``tau_i -> t_mid`` and the generator (no gradient) ``t_mid -> tau_{i+1}``, and matches the generator's direct step
    ``tau_i -> tau_{i+1}`` from the forward the DMD loss already made. Runs at ``Event.AFTER_LOSS`` of the generator
    phase; costs one teacher and one generator forward without gradient.

    Args:
        weight (float): lambda_ISG. Default: ``1.0`` (FLUX, SD 3.5 Large; 0.5 for SD 3.5 Medium).
        guidance (tuple[float, float], optional): Teacher guidance drawn per sample from U(lo, hi) for the ISG
            step: FLUX embedded (1, 8); SD 3.5 Large CFG (5, 5); Medium (2, 4). Default: the family's
            ``defaults.isg_guidance``.
        margin (int, optional): Index margin from both segment ends. Default: the family's ``defaults.isg_margin``
            (FLUX 20, SD 3.5 50).
        loss_type (str): ``charbonnier`` or ``l2``. Default: ``charbonnier``.
        charbonnier_c (float): Charbonnier constant. Default: ``1e-3``.
    """

    def __init__(self, weight: float = 1.0, guidance: Optional[Sequence[float]] = None, margin: Optional[int] = None,
                 loss_type: str = 'charbonnier', charbonnier_c: float = 1e-3):
        limits.check('algorithms.isg.loss_type', loss_type)
        if guidance is not None:
            limits.check('algorithms.isg.guidance', guidance)
        self.weight = weight
        self.guidance = None if guidance is None else tuple(float(g) for g in guidance)
        self.margin = margin
        self.loss_type = loss_type
        self.charbonnier_c = charbonnier_c

    def __repr__(self) -> str:
        return (f'IntraSegmentGuidance(weight={self.weight}, guidance={self.guidance}, margin={self.margin}, '
                f'loss_type={self.loss_type!r}, charbonnier_c={self.charbonnier_c})')

    def match(self, event: Event, state: State) -> bool:
        if event == Event.INIT:
            return True
        return event == Event.AFTER_LOSS and get_dmd_model(state, 'ISG').phase is TrainingPhase.GENERATOR

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        model = get_dmd_model(state, 'ISG')
        if event == Event.INIT:
            check_segments(model.family, model.sigmas, self.margin)  # fail at start, not at the first generator step
            return None
        step: GeneratorStep = state.outputs
        x, v, cond = step.x_t, step.velocity, step.cond
        sigma, sigma_next = step.sigma, step.sigma_next
        family = model.family
        rng = model.rng('isg')
        sigma_mid = mid_sigma(family, sigma.double(), sigma_next.double(), rng, self.margin).float()
        guidance = sample_uniform(self.guidance or family.defaults.isg_guidance, x.shape[0], rng)
        target = isg_target(lambda y, s: family.velocity(model.teacher, y, s, cond, guidance),
                            lambda y, s: family.velocity(model.generator, y, s, cond), x, sigma, sigma_mid, sigma_next)
        loss = isg_loss(x, v, sigma, sigma_next, target, self.loss_type, self.charbonnier_c)
        model.add_loss_term(state.loss, 'generator/isg', loss, self.weight)
        return None
