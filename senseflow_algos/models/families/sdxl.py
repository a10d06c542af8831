"""Stable Diffusion XL: an epsilon-prediction UNet on a discrete DDPM schedule, seen in flow coordinates.

Everything outside this family works on flow points ``x = (1 - s) x0 + s eps``. The DDPM point of the same noise level
is ``x_t = c x`` with ``c = sqrt(ab) + sqrt(1 - ab)`` and ``s = sqrt(1 - ab) / c`` (:mod:`senseflow_algos.flow`,
section "epsilon (DDPM) parameterisation"). :meth:`SDXLFamily.velocity` maps sigma to the UNet's timestep (exactly on
the 0..999 grid, interpolated in between), feeds it ``c x``, turns the predicted epsilon into ``x0`` as DMD2's
``get_x0_from_noise`` and returns ``v = (x - x0) / s``. So ``x0_from_velocity`` gives the UNet's ``x0``, a flow Euler
step is a DDIM step and the re-noise step is DMD2's / LCM's ``add_noise(x0, eps', t_next)``.

Pure noise (DMD2: "at t = 999 the input is replaced by pure noise"): index 999 is sigma 1 and at sigma 1 the UNet gets
``x`` unscaled at t = 999, as the reference generator and StableDiffusionXLPipeline (initial noise times
``init_noise_sigma = 1``) do. Default anchors: indices ``999 - k * (1000 // n)`` (DMD2's ``range(999, 0, -1000 // n)``),
``[999, 749, 499, 249]`` for 4 steps, i.e. sigmas ``[1, s(749), s(499), s(249)]``.

Differences from the reference, on purpose:

* ISG: the reference SDXL trainer re-noises both ``x_dir`` and ``x_tar`` with the mid-point generator's epsilon
  (``scheduler.add_noise``), the x0 at the mid point from the teacher's. Here the generic ISG runs (flow Euler steps,
  i.e. DDIM steps, each with its own model's epsilon).
* The deterministic ``'euler'`` sampler's first step from sigma 1 moves along ``x`` itself (flow Euler), where DDIM
  moves along the predicted epsilon: the exported DDIM pipeline differs from the in-repo Euler sampler on that step
  (the re-noise sampler, the reference's, is reproduced exactly up to LCM's boundary scalings).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from senseflow_algos import flow
from senseflow_algos.models.families.base import (
    DEFAULT_NUM_STEPS,
    Conditioning,
    ExportError,
    MethodDefaults,
    ModelFamily,
    SchedulerExport,
)

__all__ = ['SDXLFamily', 'SDXLConditioner', 'SDXL_SCHEDULE', 'build_tiny_sdxl_pipeline', 'time_ids']

#: SDXL's DDPM schedule (``scheduler/scheduler_config.json`` of stable-diffusion-xl-base-1.0).
SDXL_SCHEDULE = {'beta_start': 0.00085, 'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000}


def time_ids(height: int, width: int, batch: int, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning ``(original size, crop top-left (0, 0), target size)`` per sample, ``(batch, 6)``,
    as ``StableDiffusionXLPipeline._get_add_time_ids`` builds it for an uncropped ``height x width`` image."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return ids.expand(batch, 6)


@contextlib.contextmanager
def _float32_timestep(net: nn.Module, timestep: torch.Tensor):
    """Within this block the UNet's sinusoidal time projection gets ``timestep`` (float32) whatever dtype reached it.

    Under FSDP mixed precision the root casts every floating forward input to bf16, where t = 999 becomes 1000; a
    pre-hook on ``time_proj`` (after that cast) hands the float32 timestep back, as the SD 3.5 family does.
    """
    def restore(module, args):
        if args[0].shape != timestep.shape:
            raise RuntimeError(f'time_proj got a timestep of shape {tuple(args[0].shape)}, expected '
                               f'{tuple(timestep.shape)}')
        return (timestep.to(args[0].device), *args[1:])

    handle = net.time_proj.register_forward_pre_hook(restore, prepend=True)
    try:
        yield
    finally:
        handle.remove()


class SDXLConditioner(nn.Module):
    """Frozen CLIP-L + CLIP-G (with projection) prompt encoder through ``StableDiffusionXLPipeline.encode_prompt``.

    Returns ``prompt_embeds`` ``(B, 77, 768 + 1280)`` (both encoders' penultimate hidden states) and
    ``pooled_prompt_embeds`` ``(B, 1280)`` (CLIP-G's projection). The CFG teacher's unconditional branch is zeros
    (``force_zeros_for_empty_prompt``), built in :meth:`SDXLFamily.velocity`, so no negative embeddings are returned.

    Args:
        text_encoder, tokenizer: CLIP-L (``CLIPTextModel``) and its tokenizer.
        text_encoder_2, tokenizer_2: CLIP-G (``CLIPTextModelWithProjection``) and its tokenizer.
    """

    #: CLIP's context length: SDXL's prompts are always 77 tokens.
    max_sequence_length = 77

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.requires_grad_(False)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                                         tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=None,
                                         scheduler=None, add_watermarker=False)
        device = next(self.text_encoder.parameters()).device
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)
        return {'prompt_embeds': embeds, 'pooled_prompt_embeds': pooled}


class SDXLFamily(ModelFamily):
    """SDXL: epsilon UNet, CFG teacher with zero unconditional embeddings, anchors at DDPM indices [999, 749, 499, 249].

    Args:
        dmd_index_range (tuple[int, int]): DMD compares teacher and fake score at a DDPM index drawn uniformly from this
            range (inclusive). Default: ``(20, 980)`` (DMD2's min/max step percent .02 / .98).
        anchors (Sequence[int], optional): The student's DDPM indices (``model.family_kwargs.anchors``); the first must
            be 999 (pure noise). Default: ``999 - k * (1000 // num_steps)``.
        adversarial_weighting (str): Per-anchor GAN weight. ``sqrt_alpha_bar`` (default): the reference SDXL code's
            ``sqrt(alpha_bar_t)`` at the anchor's index, [.068, .238, .527, .822] at the 4 anchors.
            ``signal_power``: ``(1 - sigma)^2``, the paper's formula.
        vae_scale_factor (int, optional): Pixels per latent (8 for SDXL), for the time ids' image size. Default: taken
            from the VAE by :meth:`latent_shape`.
        beta_start, beta_end, beta_schedule, num_train_timesteps: The DDPM schedule (:data:`SDXL_SCHEDULE`); a teacher
            whose scheduler config differs is refused.
    """

    name = 'sdxl'
    network_class = 'UNet2DConditionModel'
    network_subfolder = 'unet'
    scheduler_class = 'EulerDiscreteScheduler'
    pipeline_class = 'StableDiffusionXLPipeline'
    text_components = ('text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2')
    # Method notes 1.3 / 3.1 / 5: DMD real guidance CFG 8; ISG teacher CFG ~ U(3, 15), margin 20 DDPM indices.
    defaults = MethodDefaults(dmd_guidance=(8.0, 8.0), isg_guidance=(3.0, 15.0), isg_margin=20)
    uses_cfg = True
    adversarial_weightings = ('sqrt_alpha_bar', 'signal_power')
    max_sequence_length = 77

    def __init__(self, dmd_index_range: tuple[int, int] = (20, 980), anchors: Optional[Sequence[int]] = None,
                 adversarial_weighting: str = 'sqrt_alpha_bar', vae_scale_factor: Optional[int] = None,
                 beta_start: float = SDXL_SCHEDULE['beta_start'], beta_end: float = SDXL_SCHEDULE['beta_end'],
                 beta_schedule: str = SDXL_SCHEDULE['beta_schedule'],
                 num_train_timesteps: int = SDXL_SCHEDULE['num_train_timesteps']):
        self.schedule = {'beta_start': beta_start, 'beta_end': beta_end, 'beta_schedule': beta_schedule,
                         'num_train_timesteps': int(num_train_timesteps)}
        lo, hi = (int(i) for i in dmd_index_range)
        if not 0 <= lo <= hi < num_train_timesteps:
            raise ValueError(f'model.family_kwargs.dmd_index_range={list(dmd_index_range)} must satisfy '
                             f'0 <= lo <= hi < {num_train_timesteps}')
        self.dmd_index_range = (lo, hi)
        self.vae_scale_factor = vae_scale_factor
        #: alpha-bar of DDPM index t and its flow sigma s(t) (increasing in t; s(999) < 1, see index_to_sigma).
        self.alphas_cumprod = flow.ddpm_alphas_cumprod(beta_start, beta_end, num_train_timesteps, beta_schedule)
        self.grid_sigmas = flow.ddpm_sigma(self.alphas_cumprod)
        self._set_adversarial_weighting(adversarial_weighting)
        self._set_anchors(anchors)

    @property
    def last_index(self) -> int:
        """The pure-noise index (999)."""
        return self.schedule['num_train_timesteps'] - 1

    # -- loading ------------------------------------------------------------------------------------------------------

    def load_components(self, pretrained, *args, **kwargs):
        components = super().load_components(pretrained, *args, **kwargs)
        self.check_scheduler_config(components.scheduler_config, f'model.pretrained={pretrained!r}')
        return components

    def check_teacher(self, teacher, where):
        if getattr(teacher.config, 'addition_embed_type', None) != 'text_time':
            raise ValueError(f"{where}: the UNet has addition_embed_type={teacher.config.addition_embed_type!r}, not "
                             "'text_time' (SDXL's pooled-text and time-id conditioning)")

    def check_scheduler_config(self, config: dict[str, Any], where: str) -> None:
        """Refuse a teacher scheduler that is not epsilon prediction on this family's DDPM schedule."""
        if config.get('prediction_type', 'epsilon') != 'epsilon':
            raise ValueError(f"{where}: scheduler prediction_type={config['prediction_type']!r}; the sdxl family "
                             "distils an epsilon-prediction teacher")
        for key, value in self.schedule.items():
            if key in config and config[key] != value:
                raise ValueError(f'{where}: scheduler {key}={config[key]!r} but the sdxl family was built for '
                                 f'{value!r} (set model.family_kwargs.{key})')

    def make_conditioner(self, modules, max_sequence_length=None):
        if max_sequence_length not in (None, SDXLConditioner.max_sequence_length):
            raise ValueError(f'max_sequence_length={max_sequence_length}: SDXL encodes prompts at CLIP\'s 77 tokens')
        return SDXLConditioner(modules['text_encoder'], modules['tokenizer'], modules['text_encoder_2'],
                               modules['tokenizer_2'])

    def tiny_pipeline(self, seed=0):
        return build_tiny_sdxl_pipeline(seed=seed)

    def build_pipeline(self, net, vae, conditioner, scheduler):
        from diffusers import StableDiffusionXLPipeline

        # No invisible watermark: it would change the pixels of the exported pipeline's images.
        return StableDiffusionXLPipeline(vae=vae, text_encoder=conditioner.text_encoder,
                                         text_encoder_2=conditioner.text_encoder_2, tokenizer=conditioner.tokenizer,
                                         tokenizer_2=conditioner.tokenizer_2, unet=net, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)

    # -- schedule -----------------------------------------------------------------------------------------------------

    def _default_anchors(self, latent_hw, num_steps=DEFAULT_NUM_STEPS):
        steps = int(num_steps)
        if steps < 1 or steps != num_steps:
            raise ValueError(f'model.num_steps must be an integer >= 1, got {num_steps!r}')
        stride = (self.last_index + 1) // steps
        if stride < 1:
            raise ValueError(f'model.num_steps={steps} exceeds the {self.last_index + 1} DDPM timesteps')
        return self.index_to_sigma(torch.tensor([self.last_index - k * stride for k in range(steps)]))

    def index_to_sigma(self, index):
        """``s(t)`` of DDPM index ``t`` (linear in between), except the pure-noise index 999 (and above): sigma 1."""
        idx = torch.as_tensor(index, dtype=torch.float64)
        grid = self.grid_sigmas.to(idx.device)
        lo = idx.floor().clamp(0, self.last_index).long()
        hi = (lo + 1).clamp_max(self.last_index)
        frac = (idx - lo).clamp(0, 1)
        sigma = grid[lo] + frac * (grid[hi] - grid[lo])
        return torch.where(idx >= self.last_index, torch.ones_like(sigma), sigma)

    def sigma_to_index(self, sigma):
        """The nearest DDPM index of ``sigma`` (sigma 1 and anything from ``s(999)`` up: 999; 0: 0)."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.round(self._continuous_index(s)).clamp(0, self.last_index)

    def _continuous_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The real-valued DDPM timestep whose ``s(t)`` is ``sigma`` (piecewise linear inverse of the grid)."""
        s = sigma.clamp(float(self.grid_sigmas[0]), float(self.grid_sigmas[-1]))  # CPU scalars: works on meta too
        grid = self.grid_sigmas.to(sigma.device)
        hi = torch.searchsorted(grid, s).clamp(1, self.last_index)
        lo = hi - 1
        return lo + (s - grid[lo]) / (grid[hi] - grid[lo])

    def dmd_sigma(self, n, rng, device=None):
        lo, hi = self.dmd_index_range
        return self.index_to_sigma(torch.randint(lo, hi + 1, (n,), generator=rng, device=device))

    def fake_score_sigma(self, n, rng, device=None):
        # t ~ U{0..999} and the reference's add_noise at t: s(t) on the grid, s(999) < 1 included (not pure noise).
        idx = torch.randint(0, self.last_index + 1, (n,), generator=rng, device=device)
        return self.grid_sigmas.to(idx.device)[idx]

    def fake_score_objective(self, v, noise, x0, x_t, sigma):
        """The reference's epsilon MSE, ``mean((eps_hat - noise)^2)``, with ``eps_hat`` recovered from ``v``."""
        t, alpha_bar, scale = self._ddpm_coordinates(self._as_sigma(sigma, x_t))
        eps = flow.epsilon_from_velocity(x_t, v, self._as_sigma(sigma, x_t), alpha_bar, scale)
        return torch.nn.functional.mse_loss(eps, noise)

    def _adversarial_weight(self, sigma):
        # sqrt_alpha_bar: the reference's sqrt(alphas_cumprod[t]) at the anchor's DDPM index (sigma 1 -> t = 999).
        sigma = torch.as_tensor(sigma)
        idx = self.sigma_to_index(sigma).long()
        return self.alphas_cumprod.to(idx.device)[idx].sqrt().to(sigma)

    # -- networks -----------------------------------------------------------------------------------------------------

    def _ddpm_coordinates(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, alpha_bar, scale)`` per sample (float64) at which the UNet sees the flow point at ``sigma``.

        Below ``s(999)`` the exact correspondence, ``t`` interpolated on the grid; a sigma within float32 rounding of a
        grid point (``|t - round(t)| < 1e-3``) takes that integer timestep and its table alpha-bar, as the pipeline's
        schedulers do. From ``s(999)`` to 1, t = 999 and its alpha-bar, while the scale goes linearly from ``c(999)``
        to 1: at sigma 1 the UNet gets ``x`` itself, the pure noise of the reference's first step.
        """
        s = sigma.to(torch.float64)
        table = self.alphas_cumprod.to(s.device)
        t = self._continuous_index(s)
        t_grid = t.round()
        snap = (t - t_grid).abs() < 1e-3
        ab_grid = table[t_grid.long()]
        t = torch.where(snap, t_grid, t)
        alpha_bar = torch.where(snap, ab_grid, flow.ddpm_alpha_bar(s))
        scale = torch.where(snap, ab_grid.sqrt() + (1 - ab_grid).sqrt(), flow.ddpm_scale(s))
        top = float(self.grid_sigmas[-1])
        c_top = float(flow.ddpm_scale(top))
        above = s >= top
        frac = ((s - top) / (1 - top)).clamp(0, 1)
        return (torch.where(above, torch.full_like(t, self.last_index), t),
                torch.where(above, table[-1].expand_as(s), alpha_bar),
                torch.where(above, c_top + frac * (1 - c_top), scale))

    def velocity(self, net, x, sigma, cond, guidance=None):
        sigma = self._as_sigma(sigma, x)
        t, alpha_bar, scale = self._ddpm_coordinates(sigma)
        x_t = flow._per_sample(scale, x) * x
        b, _, h, w = x.shape
        ids = time_ids(h * self._pixels_per_latent(), w * self._pixels_per_latent(), b, x.device)
        embeds, pooled = cond['prompt_embeds'], cond['pooled_prompt_embeds']
        t = t.to(torch.float32)
        if guidance is None:
            eps = self._call(net, x_t, t, embeds, pooled, ids)
        else:
            # One batched call, unconditional branch first, as StableDiffusionXLPipeline: zero embeddings
            # (force_zeros_for_empty_prompt), the same time ids.
            eps_uncond, eps_cond = self._call(
                net, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([torch.zeros_like(embeds), embeds]),
                torch.cat([torch.zeros_like(pooled), pooled]), torch.cat([ids, ids])).chunk(2)
            w_cfg = guidance.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
            eps = eps_uncond + w_cfg * (eps_cond - eps_uncond)
        return flow.velocity_from_epsilon(x, eps, sigma, alpha_bar, scale)

    @staticmethod
    def _call(net, x_t, t, embeds, pooled, ids):
        dtype = next(net.parameters()).dtype
        with _float32_timestep(net, t):
            return net(x_t.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                       added_cond_kwargs={'text_embeds': pooled.to(dtype), 'time_ids': ids.to(dtype)},
                       return_dict=False)[0].float()

    def _pixels_per_latent(self) -> int:
        if self.vae_scale_factor is None:
            raise RuntimeError('the sdxl family does not know its VAE scale factor yet: call latent_shape(vae, '
                               'resolution) first or set model.family_kwargs.vae_scale_factor')
        return self.vae_scale_factor

    def pooled_text_dim(self, teacher_config):
        """CLIP-G's pooled projection: the UNet's text-time input minus its 6 time ids' embeddings (2816 - 6 * 256 =
        1280 for SDXL base)."""
        return int(teacher_config.projection_class_embeddings_input_dim - 6 * teacher_config.addition_time_embed_dim)

    def latent_shape(self, vae, resolution):
        factor = 2**(len(vae.config.block_out_channels) - 1)
        if self.vae_scale_factor is None:
            self.vae_scale_factor = factor
        elif self.vae_scale_factor != factor:
            raise ValueError(f'model.family_kwargs.vae_scale_factor={self.vae_scale_factor} but the VAE downsamples '
                             f'by {factor}')
        return (vae.config.latent_channels, resolution // factor, resolution // factor)

    # -- export -------------------------------------------------------------------------------------------------------

    def export_scheduler(self, base_config, sigmas, latent_shape, method):
        """``'renoise'``: ``LCMScheduler`` at ``timesteps=`` the anchor indices (DMD2's inference scheduler): x0 from
        epsilon, then ``sqrt(ab') x0 + sqrt(1 - ab') randn`` to the next anchor, x0 itself at the last one, up to LCM's
        boundary scalings ``c_skip ~ 1e-8``. ``'euler'``: ``DDIMScheduler`` (trailing spacing, ``set_alpha_to_one``)
        with ``num_inference_steps`` = steps, whose timesteps must be the anchors and whose last step must reach x0
        (1000 divisible by the steps)."""
        from diffusers import DDIMScheduler, LCMScheduler

        try:
            self.check_scheduler_config(dict(base_config), 'the teacher scheduler config')
        except ValueError as e:
            raise ExportError(str(e)) from None
        anchors = torch.as_tensor([float(s) for s in sigmas[:-1]], dtype=torch.float64)
        if float(sigmas[-1]) != 0.0:
            raise ExportError(f'the sigmas must end at 0 (x0), got {[float(s) for s in sigmas]}')
        indices = [int(i) for i in self.sigma_to_index(anchors)]
        if (self.index_to_sigma(torch.tensor(indices)) - anchors).abs().max() > 1e-6:
            raise ExportError(f'anchors {anchors.tolist()} are not DDPM grid points (nearest indices {indices}): '
                              'the pipeline steps on integer timesteps')
        cfg = {**self.schedule, 'prediction_type': 'epsilon', 'clip_sample': False, 'thresholding': False,
               'rescale_betas_zero_snr': False}
        if method == 'renoise':
            scheduler = LCMScheduler.from_config(cfg)
            scheduler.set_timesteps(timesteps=indices)
            call = {'timesteps': indices}
        else:
            scheduler = DDIMScheduler.from_config({**cfg, 'timestep_spacing': 'trailing', 'steps_offset': 0,
                                                   'set_alpha_to_one': True})
            scheduler.set_timesteps(len(indices))
            ratio = self.schedule['num_train_timesteps'] // len(indices)
            if indices[-1] - ratio >= 0:
                raise ExportError(f'DDIM steps by {ratio} timesteps, so its last step from {indices[-1]} lands on '
                                  f'{indices[-1] - ratio}, not x0: export {len(indices)} steps with method=renoise')
            call = {'num_inference_steps': len(indices)}
        got = [int(t) for t in scheduler.timesteps]
        if got != indices:
            raise ExportError(f'the exported {type(scheduler).__name__} steps through timesteps {got}, not the '
                              f'anchors {indices}')
        table = scheduler.alphas_cumprod.double()
        if (table - self.alphas_cumprod).abs().max() > 1e-7:
            raise ExportError('the exported scheduler\'s alphas_cumprod differ from the family\'s DDPM schedule')
        fresh = type(scheduler).from_config(scheduler.config)  # set_timesteps above changed its state
        # StableDiffusionXLPipeline does not save add_watermarker: loaded where invisible-watermark is installed it
        # would watermark (change) the images unless told not to.
        return SchedulerExport(fresh, call, {'timesteps': indices, 'load_kwargs': {'add_watermarker': False}})

    def pipeline_call_kwargs(self, resolution, conditioner):
        # guidance_scale <= 1: StableDiffusionXLPipeline runs no CFG; original and target size = the resolution, as
        # the time ids of training.
        return {'height': resolution, 'width': resolution, 'guidance_scale': 0.0}

    # -- planner ------------------------------------------------------------------------------------------------------

    def planner_text_lengths(self, max_sequence_length):
        return {'text_encoder': 77, 'text_encoder_2': 77}  # both CLIPs at their context length

    def planner_conditioning(self, teacher_config, lengths, batch, dtype):
        tokens = max(lengths.values())
        return {'prompt_embeds': torch.empty(batch, tokens, teacher_config.cross_attention_dim, dtype=dtype,
                                             device='meta'),
                'pooled_prompt_embeds': torch.empty(batch, self.pooled_text_dim(teacher_config), dtype=dtype,
                                                    device='meta')}


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random-weight pipeline


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random-weight ``StableDiffusionXLPipeline`` of SDXL's classes (CPU tests, demos; nothing downloaded).

    Sizes: CLIP-L hidden 16 and CLIP-G hidden 24 / projection 24 (cross-attention 40, pooled 24), UNet 2 levels
    (32, 64 channels; ``DownBlock2D`` + ``CrossAttnDownBlock2D`` and back, one transformer layer), text-time
    embedding of 6 time ids x 8 + 24 pooled, a 2-level ``AutoencoderKL`` (scale factor 2, 4 latent channels,
    ``scaling_factor`` 0.13025 as SDXL's), and SDXL's ``EulerDiscreteScheduler`` config.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from senseflow_algos.models.tiny import _clip_config
    from senseflow_algos.models.tiny_tokenizers import tiny_clip_tokenizer

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    clip_l, (clip_g, proj_g), time_dim = 16, (24, 24), 8
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, clip_l, clip_l)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, clip_g, proj_g)).eval()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=clip_l + clip_g,
        addition_embed_type='text_time',
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj_g,
        use_linear_projection=True,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=('DownEncoderBlock2D',) * 2,
        up_block_types=('UpDecoderBlock2D',) * 2,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
        scaling_factor=0.13025,
    ).eval()
    with torch.device('cpu'):  # its sigma tables hold data, also when the planner builds the rest on meta
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULE, prediction_type='epsilon', steps_offset=1,
                                           timestep_spacing='leading', interpolation_type='linear')
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
