"""The typed record of one generator step: what :class:`~senseflow_algos.models.DMDModel` returns as Composer's
``state.outputs`` and what the algorithms read.

The generator phase of a batch produces a :class:`GeneratorStep` (with gradient); the critic phase of the same batch
gets its :meth:`GeneratorStep.detached` copy (or, on a batch without a generator phase, a step taken without
gradient). Algorithms read its attributes, and share per-batch values between the two phases through
:attr:`GeneratorStep.scratch`, which the critic's copy carries over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from senseflow_algos.models.families.base import Conditioning
from senseflow_algos.optim import TrainingPhase

__all__ = ['GeneratorStep', 'TrainingPhase']


@dataclasses.dataclass
class GeneratorStep:
    """One generator step of a training batch (``state.outputs`` of :class:`~senseflow_algos.models.DMDModel`).

    Attributes:
        phase (TrainingPhase): Phase the record belongs to: :attr:`TrainingPhase.GENERATOR` (gradient flows through
            :attr:`velocity` and :attr:`x0`) or :attr:`TrainingPhase.CRITIC` (every tensor detached).
        x_t (torch.Tensor): Generator input latents ``(B, C, H, W)`` at :attr:`sigma`: backward-simulated, or real
            latents noised to the anchor. Never has gradient.
        sigma (torch.Tensor): Per-sample anchor sigma ``(B,)`` (float32) of :attr:`x_t`.
        sigma_next (torch.Tensor): Per-sample next anchor ``(B,)`` (float32), the end of the segment that starts at
            :attr:`sigma` (0 after the last anchor).
        anchor_index (torch.Tensor): Per-sample anchor index ``(B,)`` (long) into ``model.sigmas``; one value for the
            whole batch under backward simulation.
        velocity (torch.Tensor): The generator's velocity prediction at ``(x_t, sigma)``, ``(B, C, H, W)``.
        x0 (torch.Tensor): The generator's clean estimate ``x_t - sigma * velocity``, ``(B, C, H, W)``: the sample
            the DMD loss, the fake score and the discriminator see.
        cond (Conditioning): The batch's text conditioning (``prompt_embeds``, ``pooled_prompt_embeds``, ...),
            without gradient.
        backward_simulation (bool): Whether :attr:`x_t` came from backward simulation (``True``) or from noised real
            latents (``False``).
        scratch (dict[str, Any]): Per-batch scratch area: values an algorithm computes in one phase and reuses in
            the other phase of the same batch (the critic's :meth:`detached` copy carries the entries over, tensors
            detached). Keys are namespaced by the algorithm; the VFM discriminator keeps ``vfm_reference`` (backbone
            features of the batch's real images) and ``vfm_pixels`` (the generator sample decoded to pixels in the
            generator phase) here. Default: empty.

    Example:
        .. code-block:: python

            step = state.outputs  # a GeneratorStep, e.g. at Event.AFTER_LOSS of the generator phase
            direct = flow.euler_step(step.x_t, step.velocity, step.sigma, step.sigma_next)
    """

    phase: TrainingPhase
    x_t: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    anchor_index: torch.Tensor
    velocity: torch.Tensor
    x0: torch.Tensor
    cond: Conditioning
    backward_simulation: bool
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)

    def detached(self, phase: TrainingPhase = TrainingPhase.CRITIC) -> GeneratorStep:
        """A copy for ``phase`` whose tensors (and tensor scratch entries) are detached from the autograd graph.

        :attr:`cond` and non-tensor scratch entries are shared, not copied; the scratch dict itself is a new one.

        Args:
            phase (TrainingPhase): Phase of the copy. Default: :attr:`TrainingPhase.CRITIC`.

        Returns:
            GeneratorStep: The detached copy.
        """
        def detach(value: Any) -> Any:
            return value.detach() if torch.is_tensor(value) else value

        fields = {f.name: detach(getattr(self, f.name)) for f in dataclasses.fields(self)}
        fields['phase'] = phase
        fields['scratch'] = {key: detach(value) for key, value in self.scratch.items()}
        return GeneratorStep(**fields)
