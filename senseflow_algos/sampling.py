"""Few-step sampling with a distilled generator on its training anchors (no classifier-free guidance).

Two samplers, both on the DMD model's ``sigmas`` (its anchors, 4 unless ``model.num_steps`` says otherwise, followed by
0):

* ``'renoise'`` (the SenseFlow / DMD2 default): at each anchor predict ``x0 = x - s_k v`` and re-noise it to the next
  anchor with fresh noise, ``x = (1 - s_{k+1}) x0 + s_{k+1} eps'``; the last step lands on ``x0``.
* ``'euler'``: deterministic flow Euler ``x = x + (s_{k+1} - s_k) v``.

All randomness comes from the ``torch.Generator`` passed in, in the order diffusers' pipelines draw it: the initial
noise first, then one fresh noise per step (the last one is multiplied by ``sigma = 0``). For FLUX the re-noise noise
is drawn in the packed token layout that diffusers' scheduler sees, so a pipeline written by
:mod:`senseflow_algos.export` reproduces these samples bit for bit when it draws from the same stream (see
:func:`seeded_default_rng`).

Example:
    >>> out = sample(model, ['a red circle'], rng=torch.Generator().manual_seed(0))
    >>> out.images.shape  # (1, 3, H, W) in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from senseflow_algos import flow
from senseflow_algos.models.families import DEFAULT_NUM_STEPS, Conditioning, ModelFamily

if TYPE_CHECKING:
    from PIL import Image

    from senseflow_algos.models.dmd import DMDModel

__all__ = [
    'METHODS',
    'DEFAULT_METHOD',
    'RngLike',
    'SampleOutput',
    'SamplingComponents',
    'draw_noise',
    'run_sampler',
    'sample',
    'seeded_default_rng',
    'latents_to_images',
    'images_to_pil',
]

#: Sampler names: x0-predict-then-re-noise (default) and deterministic Euler.
METHODS = ('renoise', 'euler')
#: The sampler when none is named (callbacks, export, evaluation).
DEFAULT_METHOD = 'renoise'

#: One ``torch.Generator`` for the whole batch, one per sample (as diffusers accepts), or ``None`` (global RNG).
RngLike = Union[None, torch.Generator, Sequence[torch.Generator]]

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]


@dataclass
class SampleOutput:
    """What :func:`sample` returns.

    Attributes:
        latents (Tensor): Final normalised latents ``(B, C, h, w)``, float32.
        images (Tensor | None): Decoded images ``(B, 3, H, W)`` in [0, 1] (``None`` when ``decode=False``).
    """
    latents: torch.Tensor
    images: Optional[torch.Tensor] = None

    def to_pil(self) -> list['Image.Image']:
        """The decoded images as PIL images (raises if the sample was not decoded)."""
        if self.images is None:
            raise ValueError('this sample was drawn with decode=False: there are no images to convert')
        return images_to_pil(self.images)


@dataclass
class SamplingComponents:
    """Everything a sampler needs besides the prompts: the networks and the schedule.

    Attributes:
        family (ModelFamily): The teacher family (how to query the network, how to decode).
        net (nn.Module): The generator (student) network.
        vae (nn.Module | None): The autoencoder (needed to decode).
        conditioner (nn.Module | None): Frozen text encoders, ``conditioner(prompts) -> Conditioning`` (needed when
            sampling from prompts rather than precomputed conditioning).
        sigmas (Tensor): The anchors followed by 0 (float64), e.g. ``DMDModel.sigmas``.
        latent_shape (tuple[int, int, int]): ``(C, h, w)`` of one latent.
    """
    family: ModelFamily
    net: nn.Module
    vae: Optional[nn.Module]
    conditioner: Optional[nn.Module]
    sigmas: torch.Tensor
    latent_shape: tuple[int, int, int]

    @classmethod
    def from_model(cls, model: 'DMDModel') -> 'SamplingComponents':
        """The generator, VAE, conditioner and training anchors of a :class:`~senseflow_algos.models.dmd.DMDModel`."""
        return cls(model.family, model.generator, model.vae, model.conditioner, model.sigmas,
                   tuple(model.latent_shape))

    @classmethod
    def build(cls, family: ModelFamily, net: nn.Module, vae: nn.Module, conditioner: Optional[nn.Module],
              resolution: int, anchors: Optional[Sequence[float]] = None,
              num_steps: int = DEFAULT_NUM_STEPS) -> 'SamplingComponents':
        """Components for a ``(family, generator, vae, conditioner)`` tuple at a square ``resolution``.

        Args:
            family, net, vae, conditioner: See the attributes.
            resolution (int): Image side; sets the latent shape and, for FLUX, the anchors' shift.
            anchors (Sequence[float], optional): The generator's anchors (without the final 0). Default: the family's
                training anchors at this resolution for ``num_steps`` steps.
            num_steps (int): The student's steps (``model.num_steps``) when ``anchors`` is not given. Default: ``4``.
        """
        latent_shape = tuple(family.latent_shape(vae, resolution))
        if anchors is None:
            anchors = family.anchors(latent_shape[1:], num_steps)
        return cls(family, net, vae, conditioner, flow.append_zero(anchors), latent_shape)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f'sampler method={method!r} is not known; choose one of {list(METHODS)}')


def draw_noise(shape: Sequence[int], rng: RngLike, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn the way diffusers' ``randn_tensor`` draws it.

    A CPU ``rng`` draws on the CPU and the result moves to ``device``; a list of ``torch.Generator`` streams draws
    sample ``i`` of the batch from stream ``i``.

    Args:
        shape: ``(B, ...)``.
        rng: ``None`` (global RNG of ``device``), one ``torch.Generator``, or one per sample.
        device: Where the noise ends up. Default: ``rng``'s device (CPU).
        dtype: Noise dtype. Default: float32.
    """
    device = torch.device(device) if device is not None else None
    if rng is None or isinstance(rng, torch.Generator):
        draw_on = rng.device if rng is not None else device
        return flow.sample_noise(shape, rng, device=draw_on, dtype=dtype).to(device or draw_on)
    rngs = list(rng)
    if len(rngs) != shape[0]:
        raise ValueError(f'{len(rngs)} generators were given for a batch of {shape[0]} samples; pass one per sample')
    return torch.cat([draw_noise((1, *shape[1:]), r, device, dtype) for r in rngs])


def _renoise_noise_fn(family: ModelFamily, shape: Sequence[int], rng: RngLike, device) -> NoiseFn:
    """Fresh noise for the re-noise steps, in the layout in which diffusers' scheduler draws it for ``family``
    (:meth:`~senseflow_algos.models.families.ModelFamily.scheduler_noise`)."""
    return family.scheduler_noise(tuple(shape), lambda s: draw_noise(s, rng, device))


def run_sampler(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
                method: str = DEFAULT_METHOD, noise_fn: Optional[NoiseFn] = None, progress: bool = False) -> torch.Tensor:
    """The sampling loop, family-agnostic: ``len(sigmas) - 1`` calls of ``velocity_fn``.

    Args:
        velocity_fn: ``(x, sigma_per_sample) -> v`` with ``sigma_per_sample`` of shape ``(B,)``.
        noise (Tensor): The initial sample at ``sigmas[0]`` (pure noise when ``sigmas[0] = 1``).
        sigmas: Anchors followed by the end point, e.g. ``DMDModel.sigmas`` (``[..., 0]``).
        method (str): ``'renoise'`` (x0-predict then re-noise; needs ``noise_fn``) or ``'euler'``.
        noise_fn: Returns fresh noise of the sample's shape; called once per step (also on the last step, where the
            noise is multiplied by 0, so the random stream advances exactly as diffusers' scheduler advances it).
        progress (bool): Show a progress bar over the steps.

    Returns:
        Tensor: The sample at ``sigmas[-1]`` (``x0`` when it is 0).
    """
    _check_method(method)
    if method == 'renoise' and noise_fn is None:
        raise ValueError("method='renoise' needs noise_fn, the source of the fresh noise of each step")
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f'sigmas must hold at least a start and an end point, got {sigmas}')
    x = noise
    steps = range(len(sigmas) - 1)
    for k in tqdm(steps, desc=f'sampling ({method})', leave=False, disable=not progress):
        s_from, s_to = sigmas[k], sigmas[k + 1]
        v = velocity_fn(x, torch.full((x.shape[0],), s_from, device=x.device, dtype=torch.float32))
        if method == 'euler':
            x = flow.euler_step(x, v, s_from, s_to)
        else:
            x = flow.renoise_step(x, v, s_from, s_to, noise_fn())
    return x


def latents_to_images(family: ModelFamily, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decode normalised latents to images in [0, 1] (``x / 2 + 0.5`` clamped, as diffusers post-processes)."""
    with torch.no_grad():
        pixels = family.decode_latents(vae, latents)
    return (pixels * 0.5 + 0.5).clamp(0, 1)


def images_to_pil(images: torch.Tensor) -> list['Image.Image']:
    """``(B, 3, H, W)`` images in [0, 1] to PIL images, rounded to uint8 as diffusers does."""
    from PIL import Image

    arr = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype('uint8')
    return [Image.fromarray(a) for a in arr]


def seeded_default_rng(seed: int, device: str | torch.device = 'cpu') -> torch.Generator:
    """The global (default) ``torch.Generator`` of ``device``, seeded with ``seed``.

    diffusers' pipelines draw the initial noise from the ``generator`` argument but the re-noise noise of
    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` from the device's *global* RNG (its ``step`` is
    called without a generator). Passing the default generator to both :func:`sample` and the pipeline makes both
    draw every noise from one stream, so an exported pipeline reproduces :func:`sample` exactly. On the CPU this is
    ``torch.manual_seed(seed)``. This reseeds the global RNG of ``device``.
    """
    device = torch.device(device)
    if device.type == 'cpu':
        return torch.manual_seed(seed)
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        rng = torch.cuda.default_generators[index]
        rng.manual_seed(seed)
        return rng
    raise ValueError(f'no default generator for device {device}; use a cpu or cuda device')


def _resolve(source: Union['DMDModel', SamplingComponents]) -> SamplingComponents:
    if isinstance(source, SamplingComponents):
        return source
    for attr in ('family', 'generator', 'vae', 'conditioner', 'sigmas', 'latent_shape'):
        if not hasattr(source, attr):
            raise TypeError(f'sample() takes a DMDModel or SamplingComponents; {type(source).__name__} has no '
                            f'{attr!r}')
    return SamplingComponents.from_model(source)


@torch.no_grad()
def sample(source: Union['DMDModel', SamplingComponents], prompts: Optional[Sequence[str]] = None, *,
           cond: Optional[Conditioning] = None, rng: RngLike = None, method: str = DEFAULT_METHOD,
           decode: bool = True, progress: bool = False) -> SampleOutput:
    """Generate with the student in ``len(sigmas) - 1`` steps (``model.num_steps``), no classifier-free guidance.

    Args:
        source: A :class:`~senseflow_algos.models.dmd.DMDModel` (its generator, VAE, conditioner and training
            anchors) or :class:`SamplingComponents` (e.g. ``SamplingComponents.build(family, net, vae, conditioner,
            resolution)``).
        prompts: Text prompts, encoded with the conditioner. Give either ``prompts`` or ``cond``.
        cond (Conditioning, optional): Precomputed conditioning (``prompt_embeds``, ``pooled_prompt_embeds``, ...).
        rng: ``torch.Generator`` (one stream for the batch), a list with one per sample, or ``None``. Initial
            noise is drawn first, then one fresh noise per step (re-noise sampler only).
        method (str): ``'renoise'`` (default) or ``'euler'``.
        decode (bool): Decode the latents to images with the VAE. Default: ``True``.
        progress (bool): Show a progress bar over the steps.

    Returns:
        SampleOutput: ``latents`` and, when ``decode``, ``images`` in [0, 1].
    """
    _check_method(method)
    parts = _resolve(source)
    if (prompts is None) == (cond is None):
        raise ValueError('pass exactly one of prompts= and cond=')
    if cond is None:
        if parts.conditioner is None:
            raise ValueError('sampling from prompts needs a conditioner (text encoders); pass cond= instead')
        if isinstance(prompts, str):
            prompts = [prompts]
        cond = parts.conditioner(list(prompts))
    if decode and parts.vae is None:
        raise ValueError('decode=True needs a VAE; pass decode=False to get latents only')
    param = next(parts.net.parameters())
    device = param.device
    batch = cond['prompt_embeds'].shape[0]
    shape = (batch, *parts.latent_shape)
    noise = draw_noise(shape, rng, device)
    noise_fn = _renoise_noise_fn(parts.family, shape, rng, device) if method == 'renoise' else None
    was_training = parts.net.training
    parts.net.eval()
    try:
        latents = run_sampler(lambda x, s: parts.family.velocity(parts.net, x, s, cond), noise, parts.sigmas,
                              method=method, noise_fn=noise_fn, progress=progress)
    finally:
        parts.net.train(was_training)
    images = latents_to_images(parts.family, parts.vae, latents) if decode else None
    return SampleOutput(latents=latents, images=images)
