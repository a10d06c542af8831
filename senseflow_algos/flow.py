"""Flow-matching math shared by training, sampling, ISG and the tests.

Notation (rectified flow, as FLUX and SD3 use it)::

    x_t = (1 - s) * x0 + s * eps        s = sigma in [0, 1], s = 1 is pure noise
    v   = eps - x0                      the network predicts v
    x0  = x_t - s * v

Every function here is pure: no module state, randomness only through an explicit ``torch.Generator`` (``rng``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch

__all__ = [
    'shift_sigma',
    'unshift_sigma',
    'FluxShift',
    'FLUX_SHIFT',
    'flux_mu',
    'flux_time_shift',
    'flux_time_unshift',
    'uniform_times',
    'sd3_index_to_sigma',
    'flux_index_to_sigma',
    'append_zero',
    'add_noise',
    'x0_from_velocity',
    'velocity_from_x0',
    'euler_step',
    'renoise_step',
    'backward_simulation',
    'sample_logit_normal',
    'sample_noise',
    'dmd_gradient',
    'dmd_loss',
    'charbonnier',
    'ddpm_alphas_cumprod',
    'ddpm_sigma',
    'ddpm_alpha_bar',
    'ddpm_scale',
    'x0_from_epsilon',
    'velocity_from_epsilon',
    'epsilon_from_velocity',
    'pack_latents',
    'unpack_latents',
]

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a per-sample ``(B,)`` sigma against a ``(B, ...)`` tensor."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------------------------------
# Schedules


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's static time shift ``shift * s / (1 + (shift - 1) * s)``.

    Args:
        sigma (Tensor | float): Unshifted sigma(s) in [0, 1].
        shift (float): Shift factor (3.0 for SD 3.5).

    Returns:
        Tensor: Shifted sigma(s).
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_sigma`: ``s / (shift - (shift - 1) * s)``.

    Args:
        sigma (Tensor | float): Shifted sigma(s) in [0, 1].
        shift (float): The shift factor they were shifted with.

    Returns:
        Tensor: The pre-shift sigma(s), float64.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return s / (shift - (shift - 1) * s)


class FluxShift(NamedTuple):
    """FLUX's time-shift parameters: ``mu`` rises linearly from ``base_shift`` at ``base_seq_len`` packed image
    tokens to ``max_shift`` at ``max_seq_len``. The defaults are FLUX.1-dev's scheduler config."""
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def scheduler_kwargs(self) -> dict[str, float]:
        """The same under diffusers' ``FlowMatchEulerDiscreteScheduler`` config names."""
        return dict(base_image_seq_len=self.base_seq_len, max_image_seq_len=self.max_seq_len,
                    base_shift=self.base_shift, max_shift=self.max_shift)


#: FLUX.1-dev's time shift (the one definition: flux family, tiny pipelines and the shapes world import it).
FLUX_SHIFT = FluxShift()


def flux_mu(image_seq_len: int, base_seq_len: int = FLUX_SHIFT.base_seq_len,
            max_seq_len: int = FLUX_SHIFT.max_seq_len, base_shift: float = FLUX_SHIFT.base_shift,
            max_shift: float = FLUX_SHIFT.max_shift) -> float:
    """FLUX's resolution-dependent shift exponent, linear in the number of packed image tokens.

    At 1024x1024 (4096 tokens) this is ``max_shift`` = 1.15.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_time_shift(sigma: torch.Tensor | float, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift ``e^mu / (e^mu + 1/s - 1)`` (exactly 0 at s = 0)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    safe = s.clamp_min(1e-12)
    return torch.where(s > 0, math.exp(mu) / (math.exp(mu) + 1 / safe - 1), torch.zeros_like(s))


def flux_time_unshift(sigma: torch.Tensor | float, mu: float) -> torch.Tensor:
    """Inverse of :func:`flux_time_shift` at the same ``mu``: ``1 / (1 + e^mu (1/s - 1))`` (exactly 0 at s = 0)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    safe = s.clamp_min(1e-12)
    return torch.where(s > 0, 1 / (1 + math.exp(mu) * (1 / safe - 1)), torch.zeros_like(s))


def uniform_times(num_steps: int) -> torch.Tensor:
    """The pre-shift times of a ``num_steps``-step student: ``[1, (n-1)/n, ..., 1/n]`` (float64, descending).

    A family's anchors are these through its time shift (4 steps: ``[1, .75, .5, .25]``, the reference's anchors
    before the shift). They are also what FluxPipeline passes to ``set_timesteps`` by default
    (``linspace(1, 1/n, n)``).

    Raises:
        ValueError: If ``num_steps < 1``.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'model.num_steps must be an integer >= 1, got {num_steps!r}')
    n = int(num_steps)
    return torch.arange(n, 0, -1, dtype=torch.float64) / n


def sd3_index_to_sigma(index: torch.Tensor | int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3.5 maps a 0..999 timestep index to sigma as ``shift((idx + 1) / 1000)`` (flipped scheduler sigmas)."""
    idx = torch.as_tensor(index, dtype=torch.float64)
    return shift_sigma((idx + 1) / num_train_timesteps, shift)


def flux_index_to_sigma(index: torch.Tensor | int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """FLUX's anchors are already shifted, so an index on the 0..1000 grid maps to ``idx / 1000``."""
    return torch.as_tensor(index, dtype=torch.float64) / num_train_timesteps


def append_zero(anchors: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Anchors followed by the segment end sigma = 0, so ``sigmas[i + 1]`` is always defined."""
    a = torch.as_tensor(anchors, dtype=torch.float64)
    return torch.cat([a, a.new_zeros(1)])


# ---------------------------------------------------------------------------------------------------------------------
# Forward process and steps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_t = (1 - s) x0 + s eps``."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x0 = x_t - s v``."""
    return x_t - _per_sample(sigma, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`x0_from_velocity`: ``v = (x_t - x0) / s`` (s > 0)."""
    return (x_t - x0) / _per_sample(sigma, x_t)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float,
               sigma_to: torch.Tensor | float) -> torch.Tensor:
    """Deterministic flow Euler step ``x + (s_to - s_from) v``."""
    return x + (_per_sample(sigma_to, x) - _per_sample(sigma_from, x)) * v


def renoise_step(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float,
                 noise: torch.Tensor) -> torch.Tensor:
    """x0-predict then re-noise (DMD2 / LCM sampler): ``(1 - s_to) x0 + s_to eps'`` with fresh ``eps'``."""
    return add_noise(x0_from_velocity(x, v, sigma_from), noise, sigma_to)


def sample_noise(shape: Sequence[int], rng: Optional[torch.Generator], device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from ``rng``."""
    return torch.randn(*shape, generator=rng, device=device, dtype=dtype)


def backward_simulation(velocity_fn: VelocityFn, noise_fn: Callable[[], torch.Tensor], anchors: torch.Tensor,
                        k: int) -> torch.Tensor:
    """Roll the generator out through the first ``k`` anchors and return the sample at anchor ``k``.

    Starts from pure noise, and for each anchor ``j < k`` predicts x0 and re-noises it to ``anchors[j + 1]``
    with fresh noise. Makes exactly ``k`` calls of ``velocity_fn``; ``k = 0`` returns the first noise draw.
    Call it under ``torch.no_grad()``.

    Args:
        velocity_fn: ``(x, sigma_per_sample) -> v``.
        noise_fn: Returns a fresh noise tensor of the sample shape on each call.
        anchors (Tensor): The generator's sigmas, ``anchors[0]`` is 1.
        k (int): Target anchor index.
    """
    x = noise_fn()
    batch = x.shape[0]
    for j in range(k):
        sigma_j = torch.full((batch,), float(anchors[j]), device=x.device, dtype=x.dtype)
        x = renoise_step(x, velocity_fn(x, sigma_j), sigma_j, float(anchors[j + 1]), noise_fn())
    return x


def sample_logit_normal(n: int, rng: Optional[torch.Generator], mean: float = 0.0, std: float = 1.0,
                        device=None) -> torch.Tensor:
    """``sigmoid(N(mean, std))``: SD3's logit-normal timestep density, on [0, 1] (float64 on ``device``)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=rng, device=device, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching gradient ``(x0_fake - x0_real) / mean_CHW |x0 - x0_real|``.

    The normaliser is per sample, over every non-batch dimension. A sample whose x0 already equals the teacher's
    estimate (normaliser 0) gets no gradient, rather than DMD2's ``nan_to_num`` of an infinity.
    """
    dims = tuple(range(1, x0.ndim))
    norm = (x0 - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.where(norm > 0, (x0_fake - x0_real) / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                       torch.zeros_like(x0))


def dmd_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x0 - sg(x0 - g))^2)``, whose gradient w.r.t. ``x0`` is ``g / numel``."""
    grad = dmd_gradient(x0.detach(), x0_real, x0_fake)
    return 0.5 * torch.nn.functional.mse_loss(x0.float(), (x0.detach() - grad).float())


def charbonnier(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Pseudo-Huber ``mean(sqrt((pred - target)^2 + c^2) - c)``: zero when equal, L1-like far away."""
    return (torch.sqrt((pred.float() - target.float())**2 + c * c) - c).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Epsilon (DDPM) parameterisation
#
# A DDPM point ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (``ab`` = alpha-bar, the cumulative product of ``1 - beta``) is
# the flow point ``x = (1 - s) x0 + s eps`` scaled by ``c = sqrt(ab) + sqrt(1 - ab)``, with
# ``s = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))``. Conversely ``ab = (1 - s)^2 / ((1 - s)^2 + s^2)`` and
# ``c = 1 / sqrt((1 - s)^2 + s^2)``. An epsilon network queried at ``c x`` gives ``x0`` (DMD2's ``get_x0_from_noise``)
# and so a flow velocity ``(x - x0) / s``; a flow Euler step with it is a DDIM step.


def ddpm_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                        beta_schedule: str = 'scaled_linear') -> torch.Tensor:
    """The alpha-bar table of a discrete DDPM schedule, computed in float32 as diffusers' schedulers do (float64 out).

    Args:
        beta_start, beta_end (float): First and last beta (SDXL: 0.00085, 0.012).
        num_train_timesteps (int): Table length. Default: ``1000``.
        beta_schedule (str): ``'scaled_linear'`` (betas linear in sqrt) or ``'linear'``.

    Raises:
        ValueError: For another ``beta_schedule``.
    """
    if beta_schedule == 'scaled_linear':
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)**2
    elif beta_schedule == 'linear':
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0).double()


def ddpm_sigma(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The flow sigma of a DDPM noise level: ``sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))`` (float64)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return (1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())


def ddpm_alpha_bar(sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`ddpm_sigma`: ``(1 - s)^2 / ((1 - s)^2 + s^2)`` (float64; 1 at s = 0, 0 at s = 1)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return (1 - s)**2 / ((1 - s)**2 + s**2)


def ddpm_scale(sigma: torch.Tensor | float) -> torch.Tensor:
    """The factor ``c = sqrt(ab) + sqrt(1 - ab) = 1 / sqrt((1 - s)^2 + s^2)`` taking a flow point at ``s`` to the
    DDPM point of the same noise level, ``x_t = c x`` (float64)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / ((1 - s)**2 + s**2).sqrt()


def x0_from_epsilon(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` for a DDPM point ``x_t`` (DMD2's ``get_x0_from_noise``)."""
    ab = _per_sample(alpha_bar, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def _ddpm_terms(x: torch.Tensor, sigma, alpha_bar, scale) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = ddpm_alpha_bar(sigma) if alpha_bar is None else alpha_bar
    scale = ddpm_scale(sigma) if scale is None else scale
    return _per_sample(alpha_bar, x), _per_sample(scale, x)


def velocity_from_epsilon(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float,
                          alpha_bar: Optional[torch.Tensor | float] = None,
                          scale: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """The flow velocity at the flow point ``x`` (noise level ``sigma``) of an epsilon prediction ``eps`` made at the
    DDPM point ``scale * x``: ``v = (x - x0) / s`` with ``x0`` from :func:`x0_from_epsilon`.

    ``alpha_bar`` and ``scale`` default to :func:`ddpm_alpha_bar` and :func:`ddpm_scale` of ``sigma`` (the exact
    correspondence); a family passes its own where it departs from it (e.g. pure noise at sigma 1 fed unscaled).
    """
    ab, c = _ddpm_terms(x, sigma, alpha_bar, scale)
    return velocity_from_x0(x, x0_from_epsilon(c * x, eps, ab), sigma)


def epsilon_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float,
                          alpha_bar: Optional[torch.Tensor | float] = None,
                          scale: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """Inverse of :func:`velocity_from_epsilon`: ``eps = (c x - sqrt(ab) x0) / sqrt(1 - ab)`` with ``x0 = x - s v``."""
    ab, c = _ddpm_terms(x, sigma, alpha_bar, scale)
    return (c * x - ab.sqrt() * x0_from_velocity(x, v, sigma)) / (1 - ab).sqrt()


# ---------------------------------------------------------------------------------------------------------------------
# Latent layout


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: 2x2 patch tokens, as FluxPipeline and QwenImagePipeline pack."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)
