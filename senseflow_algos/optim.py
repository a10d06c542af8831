"""One Composer optimizer for all trainable networks: AdamW over role-tagged groups, stepped in phases.

Composer accepts exactly one optimizer. DMD trains a generator and a fake score (and, with the VFM
discriminator, discriminator heads) on different cadences (TTUR). ``PhasedAdamW`` keeps them all in one
``torch.optim.AdamW`` whose param groups carry a ``role`` tag, so every Adam moment lands in Composer's
checkpoint and FSDP's param-group rebuild keeps the tags. Its ``step(closure)`` asks a *phase controller*
(the :class:`~senseflow_algos.models.DMDModel`) which phases this batch has, and for each phase runs
Composer's closure (zero-grad, forward, loss, backward), keeps only the gradients of that phase's roles,
clips them per role and steps.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, NamedTuple, Optional, Protocol, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = ['Phase', 'PhaseController', 'PhasedOptimizerMixin', 'PhasedAdamW', 'ROLES', 'NonFiniteGradientError']

#: Roles a param group may carry.
ROLES = ('generator', 'fake_score', 'discriminator')


class Phase(NamedTuple):
    """One closure pass of a training batch and the param-group roles it updates."""
    name: str
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
        self.param_groups[0].setdefault('nonfinite_skips', 0)

    @staticmethod
    def _check_groups(groups: list[dict], on_nonfinite: str) -> None:
        for group in groups:
            if group.get('role') not in ROLES:
                raise ValueError(f"every param group needs a 'role' in {ROLES}, got {group.get('role')!r}")
        if on_nonfinite not in ('stop', 'skip'):
            raise ValueError(f"optimizer.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")

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
        self.controller.end_batch()
        self._init_missing_state()
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
                f'non-finite gradient in the {phase.name} phase (roles {list(phase.roles)}); no weight was updated. '
                "Set optimizer.on_nonfinite=skip to skip such updates instead.")
        for p in params:
            p.grad = None
        self.param_groups[0]['nonfinite_skips'] = self.param_groups[0].get('nonfinite_skips', 0) + 1
        log.warning('skipped the %s update: non-finite gradient (%d skipped so far)', phase.name,
                    self.param_groups[0]['nonfinite_skips'])
        return False


class PhasedAdamW(PhasedOptimizerMixin, torch.optim.AdamW):
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
        **adamw_kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ... for :class:`torch.optim.AdamW`.
    """

    def __init__(self, params: Iterable[dict], controller: PhaseController, max_grad_norm: Optional[float] = None,
                 on_nonfinite: str = 'stop', **adamw_kwargs):
        groups = list(params)
        self._check_groups(groups, on_nonfinite)
        super().__init__(groups, **adamw_kwargs)
        self._init_phases(controller, max_grad_norm, on_nonfinite)

    def _init_missing_state(self) -> None:
        """Give every trainable parameter AdamW state, also one that has had no gradient yet.

        torch's distributed checkpoint loader expects state for every trainable parameter; an empty state (step 0,
        zero moments) is exactly what AdamW creates at a parameter's first gradient, so updates are unchanged.
        """
        for group in self.param_groups:
            for p in group['params']:
                if p.requires_grad and not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0, dtype=torch.float32),
                                         exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
                    if group['amsgrad']:
                        self.state[p]['max_exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
