"""One Composer optimizer for all trainable networks: AdamW over role-tagged groups, stepped in phases.

Composer accepts exactly one optimizer. DMD trains a generator and a fake score (and, with the VFM
discriminator, discriminator heads) on different cadences (TTUR). ``PhasedAdamW`` keeps them all in one
``torch.optim.AdamW`` whose param groups carry a ``role`` tag, so every Adam moment lands in Composer's
checkpoint and FSDP's param-group rebuild keeps the tags. Its ``step(closure)`` asks a *phase controller*
(the :class:`~senseflow_algos.models.DMDModel`) which phases this batch has, and for each phase runs
Composer's closure (zero-grad, forward, loss, backward), keeps only the gradients of that phase's roles,
clips them per role and steps.

Trained weights are fp32 by default (bf16 compute comes from autocast or FSDP mixed precision). bf16/fp16 trained
parameters are accepted only with ``stochastic_rounding=True``: their AdamW update is computed in fp32 (fp32 moments,
upcast weight) and written back with :mod:`~senseflow_algos.stochastic_rounding`, since a plain bf16 update rounds
away every step below half a bf16 spacing (8e-5 at a weight of 0.02, against lr 1e-5).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Protocol, Sequence

import torch

from senseflow_algos import limits
from senseflow_algos.checks.trained_precision import LOW_PRECISION_REASON
from senseflow_algos.stochastic_rounding import (
    DeviceRngs,
    copy_stochastic_,
    draw_seed,
    is_low_precision,
    local_tensor,
)

log = logging.getLogger(__name__)

__all__ = ['TrainingPhase', 'Phase', 'PhaseController', 'PhasedOptimizerMixin', 'PhasedAdamW', 'LowPrecisionAdamW', 'ROLES',
           'NonFiniteGradientError', 'LOW_PRECISION_REASON']

#: Roles a param group may carry.
ROLES = ('generator', 'fake_score', 'discriminator')


class TrainingPhase(enum.Enum):
    """The phases of a DMD training batch (TTUR): which networks one closure pass trains.

    ``str(phase)`` is its lower-case value (``generator``, ``critic``), as in logs and error messages.
    """

    #: The generator (student) steps on the DMD loss and the generator terms of the algorithms.
    GENERATOR = 'generator'
    #: The fake score (and the discriminator heads, if any) step on the detached generator sample.
    CRITIC = 'critic'

    def __str__(self) -> str:
        return self.value


class Phase(NamedTuple):
    """One closure pass of a training batch and the param-group roles it updates.

    Attributes:
        kind (TrainingPhase): Which phase this is; the controller sets its own phase from it (``model.phase``).
        roles (tuple[str, ...]): Roles (:data:`ROLES`) of the param groups this phase updates.
    """
    kind: TrainingPhase
    roles: tuple[str, ...]


class PhaseController(Protocol):
    """What :class:`PhasedAdamW` needs from the model."""

    def training_phases(self) -> Sequence[Phase]:
        """Phases of the current batch, in order."""
        ...

    def begin_phase(self, phase: Phase) -> None:
        """Called before the closure of ``phase`` runs."""
        ...

    def end_phase(self, phase: Phase) -> None:
        """Called after the optimizer step of ``phase``."""
        ...

    def end_batch(self) -> None:
        """Called once all phases of the batch are stepped."""
        ...


class NonFiniteGradientError(FloatingPointError):
    """A phase produced a NaN or Inf gradient and ``on_nonfinite='stop'``."""


class PhasedOptimizerMixin:
    """The phase logic of :class:`PhasedAdamW`, for any torch optimizer class that follows it in the MRO
    (``class X(PhasedOptimizerMixin, SomeAdamW)``): role checks, one closure and one base-class update per phase,
    per-role clipping, non-finite handling. See :class:`PhasedAdamW` for the arguments."""

    def _init_phases(self, controller: PhaseController, max_grad_norm: Optional[float], on_nonfinite: str) -> None:
        self.controller = controller
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self._in_phases = False  # True while step(closure) runs the phases of a training batch
        self.param_groups[0].setdefault('nonfinite_skips', 0)

    @staticmethod
    def _check_groups(groups: list[dict], on_nonfinite: str) -> None:
        for group in groups:
            if group.get('role') not in ROLES:
                raise ValueError(f"every param group needs a 'role' in {ROLES}, got {group.get('role')!r}")
        limits.check('optimizer.on_nonfinite', on_nonfinite)

    def _init_missing_state(self) -> None:
        """Hook run after each batch: create the empty state of parameters that had no gradient yet (needed by
        torch's distributed checkpoint loader; see :class:`PhasedAdamW`). Default: nothing."""

    def params_of(self, roles: Iterable[str]) -> list[torch.nn.Parameter]:
        """All parameters in groups whose role is in ``roles``."""
        wanted = set(roles)
        return [p for g in self.param_groups if g['role'] in wanted for p in g['params']]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """Run every phase of the batch: closure (forward + backward), then an update of that phase's roles.

        Args:
            closure: Composer's training closure (precision ``fp32`` or ``amp_bf16``; ``amp_fp16`` steps without one
                and is not supported). Without a closure this is a plain AdamW step over existing gradients.

        Returns:
            The last phase's loss, as the closure returned it.
        """
        if closure is None:
            # torch.distributed.checkpoint initialises optimizer state with a zero-lr, zero-grad step(None);
            # training always comes through Composer's closure (the DMD model refuses forwards outside a phase).
            return super().step()
        loss = None
        self._in_phases = True
        try:
            loss = self._run_phases(closure)
        finally:
            self._in_phases = False
        self.controller.end_batch()
        self._init_missing_state()
        return loss

    def _run_phases(self, closure: Callable[[], float]):
        loss = None
        for phase in self.controller.training_phases():
            self.controller.begin_phase(phase)
            with torch.enable_grad():
                loss = closure()
            # Terms of this phase's loss may also reach other roles (e.g. the generator's adversarial term
            # back-propagates into the discriminator heads); those gradients are not this phase's to apply.
            for group in self.param_groups:
                if group['role'] not in phase.roles:
                    for p in group['params']:
                        p.grad = None
            if self._finite_or_skip(phase):
                if self.max_grad_norm is not None:
                    for role in phase.roles:
                        self._clip(role)
                super().step()
            self.controller.end_phase(phase)
        return loss

    def _clip(self, role: str) -> None:
        """Clip one role's gradients to ``max_grad_norm`` (through the controller when it owns the network: an FSDP
        root must compute the norm across shards)."""
        clip = getattr(self.controller, 'clip_grad_norm', None)
        if clip is not None and clip(role, self.max_grad_norm):
            return
        grads = [p for p in self.params_of([role]) if p.grad is not None]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)

    def _finite_or_skip(self, phase: Phase) -> bool:
        """``True`` if every gradient of the phase is finite; else raise (``stop``) or drop them and count (``skip``)."""
        params = [p for p in self.params_of(phase.roles) if p.grad is not None]
        if not params:
            return True
        norms = torch._foreach_norm([p.grad for p in params])
        if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return True
        if self.on_nonfinite == 'stop':
            raise NonFiniteGradientError(
                f'non-finite gradient in the {phase.kind} phase (roles {list(phase.roles)}); no weight was updated. '
                "Set optimizer.on_nonfinite=skip to skip such updates instead.")
        for p in params:
            p.grad = None
        self.param_groups[0]['nonfinite_skips'] = self.param_groups[0].get('nonfinite_skips', 0) + 1
        log.warning('skipped the %s update: non-finite gradient (%d skipped so far)', phase.kind,
                    self.param_groups[0]['nonfinite_skips'])
        return False


def _stream_seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 62) - 1)


class LowPrecisionAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that also trains bf16/fp16 parameters without losing small steps, or refuses them.

    fp32 parameters take torch's own AdamW update. A bf16/fp16 parameter (accepted only with
    ``stochastic_rounding=True``) gets the same AdamW update computed in fp32 (fp32 moments, upcast weight, decoupled
    weight decay, bias-corrected Adam step) and written back with stochastic rounding, so the weight moves by the
    fp32 update in expectation. Parameters may be plain tensors, FSDP1 ``use_orig_params`` views or FSDP2 DTensors
    (each rank updates its local shard).

    Args:
        params: Parameters or param groups.
        stochastic_rounding (bool): Accept bf16/fp16 parameters and update them as above. Default: ``False`` (such
            parameters are refused, naming :data:`LOW_PRECISION_REASON`).
        rounding_seed (int): Seed of the rounding stream when :meth:`_rounding_seed` has no better source: update
            ``n`` draws from ``(rounding_seed, n)``, ``n`` counted in ``param_groups[0]['rounding_updates']`` (saved
            with the optimizer, so a resumed run continues the stream). Default: ``0``.
        **adamw_kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``, ... for AdamW.
    """

    def __init__(self, params, stochastic_rounding: bool = False, rounding_seed: int = 0, **adamw_kwargs):
        self.stochastic_rounding = bool(stochastic_rounding)
        self.rounding_seed = int(rounding_seed)
        super().__init__(params, **adamw_kwargs)
        # Moments of low-precision parameters are fp32; torch's loader would cast them to the parameter's dtype.
        self.register_load_state_dict_pre_hook(_keep_loaded_state)
        self.register_load_state_dict_post_hook(_restore_fp32_moments)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; bf16/fp16 trainable parameters need ``stochastic_rounding=True``."""
        super().add_param_group(param_group)
        self._check_precision(self.param_groups[-1]['params'])

    def _check_precision(self, params: Iterable[torch.Tensor]) -> None:
        if self.stochastic_rounding:
            return
        low = sorted({str(p.dtype) for p in params if p.requires_grad and is_low_precision(p)})
        if low:
            raise ValueError(f'trainable parameters in {", ".join(low)} and optimizer.stochastic_rounding is false '
                             f'(model.dtype): {LOW_PRECISION_REASON}')

    def _rounding_seed(self) -> int:
        """Seed of this update's rounding bits (subclasses may take it from a run-wide stream)."""
        n = int(self.param_groups[0].get('rounding_updates', 0))
        self.param_groups[0]['rounding_updates'] = n + 1
        return _stream_seed('stochastic_rounding', self.rounding_seed, n)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """One AdamW update of every parameter with a gradient (see the class docstring for low-precision ones)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        low = [(group, p) for group in self.param_groups for p in group['params']
               if p.grad is not None and is_low_precision(p)]
        if not low:
            super().step()
            return loss
        self._check_precision([p for _, p in low])  # cast to low precision after the optimizer was built
        # torch's AdamW would keep bf16 moments and round the update away: hide these gradients from it.
        grads = [p.grad for _, p in low]
        for _, p in low:
            p.grad = None
        try:
            super().step()
        finally:
            for (_, p), grad in zip(low, grads):
                p.grad = grad
        rngs = DeviceRngs(self._rounding_seed())
        for group, p in low:
            self._fp32_update(group, p, rngs)
        return loss

    def _fp32_update(self, group: dict[str, Any], p: torch.Tensor, rngs: DeviceRngs) -> None:
        """AdamW (torch's formula, single-tensor form) in fp32 on ``p``'s local values; stochastic write-back."""
        state = self.state[p]
        if not state:
            state.update(_fp32_moments(p, group['amsgrad']))
        beta1, beta2 = (float(b) for b in group['betas'])
        lr, eps, weight_decay = float(group['lr']), float(group['eps']), float(group['weight_decay'])
        state['step'] += 1
        step = float(state['step'])
        grad = local_tensor(p.grad).float()
        if group['maximize']:
            grad = -grad
        exp_avg, exp_avg_sq = local_tensor(state['exp_avg']), local_tensor(state['exp_avg_sq'])
        weight = local_tensor(p).float()
        weight.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second = exp_avg_sq
        if group['amsgrad']:
            second = local_tensor(state['max_exp_avg_sq'])
            torch.maximum(second, exp_avg_sq, out=second)
        denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        copy_stochastic_(p, weight, rngs(weight.device))


def _fp32_moments(p: torch.Tensor, amsgrad: bool) -> dict[str, torch.Tensor]:
    """Empty AdamW state of a low-precision parameter: step 0 and fp32 moments (DTensors for a DTensor ``p``)."""
    state = {'step': torch.tensor(0.0, dtype=torch.float32),
             'exp_avg': torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format),
             'exp_avg_sq': torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)}
    if amsgrad:
        state['max_exp_avg_sq'] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    return state


def _keep_loaded_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    optimizer._loaded_state = (state_dict['param_groups'], state_dict['state'])


def _restore_fp32_moments(optimizer: torch.optim.Optimizer) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of a low-precision parameter's moments to its dtype."""
    saved_groups, saved_state = optimizer.__dict__.pop('_loaded_state')
    saved_ids = [i for g in saved_groups for i in g['params']]
    params = [p for g in optimizer.param_groups for p in g['params']]
    for saved_id, p in zip(saved_ids, params):
        if is_low_precision(p) and saved_id in saved_state:
            for key, value in saved_state[saved_id].items():
                if key != 'step' and isinstance(value, torch.Tensor) and value.is_floating_point():
                    optimizer.state[p][key] = value.to(dtype=torch.float32, device=p.device)


class PhasedAdamW(PhasedOptimizerMixin, LowPrecisionAdamW):
    """AdamW whose ``step(closure)`` runs one closure and one update per training phase.

    Args:
        params (Iterable[dict]): Param groups, each with a ``role`` key from :data:`ROLES`
            (and optionally its own ``lr``, ``weight_decay``, ...).
        controller (PhaseController): Decides the phases of each batch (usually the DMD model).
        max_grad_norm (float, optional): If set, gradients are clipped to this norm per role, as each
            network had its own optimizer in the reference trainer. Default: ``None``.
        on_nonfinite (str): What a phase with a NaN or Inf gradient does: ``stop`` raises
            :class:`NonFiniteGradientError` before any weight changes (so nothing non-finite reaches a checkpoint);
            ``skip`` drops that phase's update and counts it in ``param_groups[0]['nonfinite_skips']`` (saved with
            the optimizer state). Default: ``stop``.
        stochastic_rounding (bool): Accept bf16/fp16 trained parameters: their AdamW update is computed in fp32 and
            written back with stochastic rounding (see :class:`LowPrecisionAdamW`). The rounding bits come from the
            controller's ``rng('stochastic_rounding', per_rank=False)`` stream when it has one (seeded by the run's
            seed and batch, so a resumed run rounds identically; the same on every rank, so replicated shards under
            DDP or hybrid sharding stay identical). Default: ``False``: such parameters are refused.
        **adamw_kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ... for :class:`torch.optim.AdamW`.
    """

    def __init__(self, params: Iterable[dict], controller: PhaseController, max_grad_norm: Optional[float] = None,
                 on_nonfinite: str = 'stop', stochastic_rounding: bool = False, **adamw_kwargs):
        groups = list(params)
        self._check_groups(groups, on_nonfinite)
        super().__init__(groups, stochastic_rounding=stochastic_rounding, **adamw_kwargs)
        self._init_phases(controller, max_grad_norm, on_nonfinite)

    def _rounding_seed(self) -> int:
        """Inside a training batch, a draw from the controller's stream; otherwise (e.g. torch's checkpoint loader
        initialising state with a zero step) the optimizer's own counted stream."""
        rng = getattr(self.controller, 'rng', None)
        if rng is not None and self._in_phases:
            return draw_seed(rng('stochastic_rounding', per_rank=False))
        return super()._rounding_seed()

    def _init_missing_state(self) -> None:
        """Give every trainable parameter AdamW state, also one that has had no gradient yet.

        torch's distributed checkpoint loader expects state for every trainable parameter; an empty state (step 0,
        zero moments) is exactly what AdamW creates at a parameter's first gradient, so updates are unchanged.
        """
        for group in self.param_groups:
            for p in group['params']:
                if p.requires_grad and not self.state[p] and is_low_precision(p):
                    self.state[p].update(_fp32_moments(p, group['amsgrad']))  # as _fp32_update creates them
                elif p.requires_grad and not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0, dtype=torch.float32),
                                         exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
                    if group['amsgrad']:
                        self.state[p]['max_exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
