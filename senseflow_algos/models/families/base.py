"""The interface every teacher family implements (FLUX, SD 3.5, ...): everything that differs between teachers.

A family knows which diffusers classes make up its pipeline and how to load them, how its prompts become
conditioning tensors, how to query one of its networks for a velocity at ``(x_t, sigma)`` (with or without teacher
guidance), its anchors, how its 0..1000 timestep indices map to sigma, how latents go to and from pixels, how a
student is exported as its diffusers pipeline, and the per-teacher defaults of the method
(:class:`MethodDefaults`). Everything else (DMD, ISG, backward simulation, samplers, export, the planner) is
family-agnostic: it works on unpacked ``(B, C, h, w)`` latents in flow coordinates ``x = (1 - sigma) x0 + sigma eps``
with the helpers in :mod:`senseflow_algos.flow`, and never names a family.

Adding a teacher is one module in this package with a :class:`ModelFamily` subclass; it is registered by its
``name`` when the package is imported.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ['Components', 'ModelFamily', 'PackedShiftedFlowFamily', 'MethodDefaults', 'SchedulerExport',
           'ConstantPromptCache', 'Conditioning', 'ExportError', 'UNIFORM_ANCHORS',
           'DEFAULT_NUM_STEPS', 'drop_vae_encoder']

#: Student sampling steps (= anchors) when none are named: the paper's 4.
DEFAULT_NUM_STEPS = 4

#: The four generator timesteps before each family's shift (``flow.uniform_times(4)``; other step counts: that).
UNIFORM_ANCHORS = (1.0, 0.75, 0.5, 0.25)

#: Conditioning tensors by name, e.g. ``prompt_embeds`` and ``pooled_prompt_embeds``.
Conditioning = dict[str, torch.Tensor]


@dataclass
class Components:
    """Everything a DMD run builds from one teacher.

    Attributes:
        teacher: The frozen teacher network (FLUX keeps its guidance embedding).
        student: The network generator and fake score are copied from (FLUX: without guidance embedding).
        vae: The frozen autoencoder.
        conditioner: Frozen text encoders and tokenizers as one module: ``conditioner(prompts) -> Conditioning``;
            ``None`` when built without text encoders (training on precomputed embeddings).
        scheduler_config: The teacher scheduler's config (for export).
    """
    teacher: nn.Module
    student: nn.Module
    vae: nn.Module
    conditioner: Optional[nn.Module]
    scheduler_config: dict


@dataclass(frozen=True)
class MethodDefaults:
    """A teacher's defaults for the method's per-teacher settings (reference values, method notes sections 1.3, 3.1).

    The one place they live: :class:`~senseflow_algos.models.DMDModel` and the ISG algorithm read them when the YAML
    leaves the setting out.

    Attributes:
        dmd_guidance: Teacher guidance of the DMD real score, drawn per sample from U(lo, hi) (embedded guidance or CFG
            scale, per the family's :meth:`ModelFamily.velocity`).
        isg_guidance: Teacher guidance of ISG's teacher step, U(lo, hi).
        isg_margin: Index margin ISG keeps from both ends of a segment, on the family's 0..1000 grid.
    """
    dmd_guidance: tuple[float, float]
    isg_guidance: tuple[float, float]
    isg_margin: int


class ExportError(ValueError):
    """An export that cannot proceed; the message names the file, key or value at fault."""


class ConstantPromptCache:
    """The encoding of a prompt that never changes (a CFG teacher's empty or negative prompt), made once per device and
    dtype and expanded to each batch, instead of re-running the text encoders on it every batch.

    The text encoders are frozen and kept out of checkpoints, so the encoding cannot go stale.
    """

    def __init__(self):
        self._cache: dict[tuple[str, torch.dtype], Conditioning] = {}

    def get(self, encoder: nn.Module, encode: Callable[[], Conditioning], batch: int) -> Conditioning:
        """``encode()`` (a batch of one) the first time for ``encoder``'s device and dtype, then from the cache;
        expanded to ``batch`` rows."""
        param = next(encoder.parameters())
        key = (str(param.device), param.dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.detach() for k, v in encode().items()}
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._cache[key].items()}


def drop_vae_encoder(vae: nn.Module) -> nn.Module:
    """Remove the encoder half of an ``AutoencoderKL`` (training on precomputed latents needs only the decoder)."""
    vae.encoder = None
    if getattr(vae, 'quant_conv', None) is not None:
        vae.quant_conv = None
    return vae


class ModelFamily(abc.ABC):
    """Family-specific behaviour. Subclasses are stateless apart from their config.

    Class attributes name the family's diffusers classes; subclasses set them. Every family accepts ``anchors``
    (``model.family_kwargs.anchors``): the student's timestep indices on the family's 0..1000 grid, e.g.
    ``[999, 749, 499, 249]``, instead of its default anchors.
    """

    #: Registry name used in YAML (``model.family``).
    name: str = ''
    #: The diffusers class of the denoiser (teacher, generator and fake score).
    network_class: str = ''
    #: Its folder in a pipeline, which is also the pipeline constructor's keyword for it.
    network_subfolder: str = 'transformer'
    #: The diffusers class of the autoencoder.
    vae_class: str = 'AutoencoderKL'
    #: The diffusers class of the teacher's scheduler (its config is kept for the export).
    scheduler_class: str = 'FlowMatchEulerDiscreteScheduler'
    #: The diffusers pipeline class a student is exported as.
    pipeline_class: str = ''
    #: The pipeline components the conditioner holds (text encoders and tokenizers), as attributes of the same name.
    text_components: tuple[str, ...] = ()
    #: The method's per-teacher defaults.
    defaults: MethodDefaults
    #: The teacher is guided by CFG (a conditional and an unconditional branch), not by a guidance embedding.
    uses_cfg: bool = False
    #: Config overrides of the teacher's network that make the base of a LoRA export (FLUX drops guidance).
    lora_base_overrides: dict[str, Any] = {}
    #: Its conditioning has a fixed shape per prompt, so it can be precomputed into MDS columns
    #: (``data_prep/precompute.py``, ``dataset.kind: precomputed``); not where prompts have their own lengths and masks.
    precomputable_conditioning: bool = True
    #: Prompt tokens of the long text encoder (families set it in ``__init__``).
    max_sequence_length: int = 512
    #: Anchor indices given in YAML (``model.family_kwargs.anchors``); ``None``: the family's default anchors.
    anchor_indices: Optional[tuple[int, ...]] = None

    def _set_anchors(self, anchors: Optional[Sequence[int]]) -> None:
        """Keep ``model.family_kwargs.anchors``: strictly descending indices on the family's 0..1000 grid."""
        if anchors is None:
            self.anchor_indices = None
            return
        indices = tuple(int(a) for a in anchors)
        if not indices or any(a != float(b) for a, b in zip(indices, anchors)) or any(not 0 < a <= 1000 for a in indices) \
                or any(a <= b for a, b in zip(indices, indices[1:])):
            raise ValueError(f'model.family_kwargs.anchors={list(anchors)} must be strictly descending integer '
                             f'timestep indices in 1..1000 of the {self.name} schedule, e.g. [999, 749, 499, 249]')
        self.anchor_indices = indices

    # -- loading ------------------------------------------------------------------------------------------------------

    def load_components(self, pretrained: str, torch_dtype: torch.dtype = torch.float32,
                        teacher_dtype: Optional[torch.dtype] = None, revision: Optional[str] = None,
                        text_encoders: bool = True, vae_encoder: bool = True,
                        encoder_dtype: Optional[torch.dtype] = None, transformers_on_meta: bool = False) -> Components:
        """Load every component with ``from_pretrained`` from a hub id or a local diffusers folder.

        ``torch_dtype`` is the student's (generator and fake score), ``teacher_dtype`` the teacher's (default: the
        student's) and ``encoder_dtype`` that of the VAE and text encoders (default: the teacher's).
        ``text_encoders=False`` loads no text encoder (``conditioner=None``); ``vae_encoder=False`` drops the VAE's
        encoder: for training on precomputed embeddings and latents. ``transformers_on_meta=True`` reads no
        network weight: teacher and student are built on the meta device from the network's config, to be
        filled by FSDP from global rank 0 (the lean start, :func:`~senseflow_algos.models.fsdp.lean_start`).
        """
        import diffusers

        teacher_dtype = teacher_dtype or torch_dtype
        encoder_dtype = encoder_dtype or teacher_dtype
        teacher = self._load_transformer(getattr(diffusers, self.network_class), pretrained, teacher_dtype, revision,
                                         on_meta=transformers_on_meta)
        self.check_teacher(teacher, f'model.pretrained={pretrained!r}')
        student = self.student_from_teacher(teacher, torch_dtype)  # on meta too when the teacher is
        vae = self._load_vae(pretrained, encoder_dtype, revision)
        scheduler_class = getattr(diffusers, self.scheduler_class)
        return Components(
            teacher=teacher,
            student=student,
            vae=vae if vae_encoder else drop_vae_encoder(vae),
            conditioner=self._load_conditioner(pretrained, encoder_dtype, revision) if text_encoders else None,
            scheduler_config=dict(scheduler_class.load_config(pretrained, subfolder='scheduler', revision=revision)),
        )

    def check_teacher(self, teacher: nn.Module, where: str) -> None:
        """Refuse a teacher network this family cannot distil (``where`` names its source). Default: accept."""
        return None

    def student_from_teacher(self, teacher: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The network generator and fake score start from: a copy of the teacher (on meta if the teacher is)."""
        student = copy.deepcopy(teacher)
        return student.to(dtype) if dtype is not None else student

    @abc.abstractmethod
    def make_conditioner(self, modules: dict[str, Any], max_sequence_length: Optional[int] = None) -> nn.Module:
        """The frozen prompt encoder from the modules named in :attr:`text_components` (tokenizers may be ``None``
        where only shapes matter, as in the planner). ``max_sequence_length``: default the family's."""

    def conditioner_from_pipeline(self, pipe, max_sequence_length: Optional[int] = None) -> nn.Module:
        """:meth:`make_conditioner` on the text encoders and tokenizers of a loaded pipeline of this family."""
        return self.make_conditioner({name: getattr(pipe, name) for name in self.text_components},
                                     max_sequence_length)

    def components_from_pipeline(self, pipe, text_encoders: bool = True, vae_encoder: bool = True,
                                 max_sequence_length: Optional[int] = None) -> Components:
        """:class:`Components` from a pipeline object of this family (the teacher is the pipeline's network)."""
        teacher = getattr(pipe, self.network_subfolder)
        return Components(
            teacher=teacher,
            student=self.student_from_teacher(teacher),
            vae=pipe.vae if vae_encoder else drop_vae_encoder(pipe.vae),
            conditioner=self.conditioner_from_pipeline(pipe, max_sequence_length) if text_encoders else None,
            scheduler_config=dict(pipe.scheduler.config),
        )

    @abc.abstractmethod
    def tiny_pipeline(self, seed: int = 0):
        """A random-weight tiny pipeline of the family's real classes (CPU tests, demos; nothing downloaded)."""

    def tiny_components(self, seed: int = 0, text_encoders: bool = True, vae_encoder: bool = True) -> Components:
        """:meth:`tiny_pipeline` as :class:`Components` (flags as in :meth:`load_components`)."""
        pipe = self.tiny_pipeline(seed=seed)
        return self.components_from_pipeline(pipe, text_encoders, vae_encoder, self._tiny_sequence_length(pipe))

    def _tiny_sequence_length(self, pipe) -> Optional[int]:
        """Prompt tokens of the tiny conditioner. Default: the family's."""
        return None

    def load_encoders(self, pretrained: str, torch_dtype: torch.dtype = torch.float32,
                      revision: Optional[str] = None) -> tuple[nn.Module, nn.Module]:
        """Only the conditioner and the VAE (``data_prep/precompute.py``), no network."""
        return self._load_conditioner(pretrained, torch_dtype, revision), self._load_vae(pretrained, torch_dtype,
                                                                                         revision)

    def _load_conditioner(self, pretrained: str, torch_dtype: torch.dtype, revision: Optional[str]) -> nn.Module:
        """The text components from a pipeline folder or hub id, each by the class its ``model_index.json`` names
        (tokenizers through ``AutoTokenizer``), then :meth:`make_conditioner`."""
        import transformers
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(pretrained, revision=revision)
        modules = {}
        for name in self.text_components:
            if name not in index:
                raise ValueError(f'model.pretrained={pretrained!r}: model_index.json has no {name!r}, which a '
                                 f'{self.name} pipeline has ({", ".join(self.text_components)})')
            kw = dict(subfolder=name, revision=revision)
            if name.startswith('tokenizer'):
                modules[name] = transformers.AutoTokenizer.from_pretrained(pretrained, **kw)
            else:
                modules[name] = getattr(transformers, index[name][1]).from_pretrained(pretrained, torch_dtype=torch_dtype,
                                                                                      **kw)
        return self.make_conditioner(modules)

    def _load_transformer(self, model_class: type, pretrained: str, torch_dtype: torch.dtype, revision: Optional[str],
                          on_meta: bool = False) -> nn.Module:
        """The teacher network of class ``model_class`` (eval mode) with its weights, or ``on_meta`` without.

        On meta it is built from the same ``<network_subfolder>/config.json`` as ``from_pretrained`` reads, so
        parameters and buffers have the names, shapes and dtypes of the loaded network while taking no memory.
        """
        kw = dict(subfolder=self.network_subfolder, revision=revision)
        if not on_meta:
            return model_class.from_pretrained(pretrained, torch_dtype=torch_dtype, **kw)
        if getattr(model_class, '_keep_in_fp32_modules', None):  # from_pretrained would keep those in fp32
            raise NotImplementedError(f'{model_class.__name__} keeps modules in fp32: a meta build would not match')
        with torch.device('meta'):
            net = model_class.from_config(model_class.load_config(pretrained, **kw))
        net.register_to_config(_name_or_path=pretrained)  # as from_pretrained records it
        return nn.Module.to(net, torch_dtype).eval()  # nn.Module's: diffusers' .to() warns about fp32 modules

    def _load_vae(self, pretrained: str, torch_dtype: torch.dtype, revision: Optional[str]) -> nn.Module:
        import diffusers

        return getattr(diffusers, self.vae_class).from_pretrained(pretrained, subfolder='vae', torch_dtype=torch_dtype,
                                                                  revision=revision)

    def tiny_encoders(self, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """The conditioner and VAE of :meth:`tiny_components` (same weights for the same seed)."""
        components = self.tiny_components(seed=seed)
        return components.conditioner, components.vae

    # -- schedule -----------------------------------------------------------------------------------------------------

    def anchors(self, latent_hw: tuple[int, int], num_steps: int = DEFAULT_NUM_STEPS) -> torch.Tensor:
        """The generator's ``num_steps`` sigmas (float64, descending, first is 1) for latents of size ``latent_hw``.

        ``model.family_kwargs.anchors`` when given (indices through :meth:`index_to_sigma`), else the family's
        default (:meth:`_default_anchors`).
        """
        if self.anchor_indices is None:
            return self._default_anchors(latent_hw, num_steps)
        if len(self.anchor_indices) != num_steps:
            raise ValueError(f'model.family_kwargs.anchors has {len(self.anchor_indices)} indices but model.num_steps='
                             f'{num_steps}; give one index per step')
        sigmas = self.index_to_sigma(torch.tensor(self.anchor_indices, dtype=torch.float64)).double()
        if abs(float(sigmas[0]) - 1.0) > 1e-9:
            raise ValueError(f'model.family_kwargs.anchors={list(self.anchor_indices)}: the first anchor must be pure '
                             f'noise (sigma 1), but index {self.anchor_indices[0]} is sigma {float(sigmas[0]):.6f} in the '
                             f'{self.name} schedule')
        return sigmas

    @abc.abstractmethod
    def _default_anchors(self, latent_hw: tuple[int, int], num_steps: int) -> torch.Tensor:
        """The family's own anchors: :func:`~senseflow_algos.flow.uniform_times` (``[1, .75, .5, .25]`` for 4 steps)
        through the family's time shift, as the reference derives its 4 anchors (or the family's index rule)."""

    @abc.abstractmethod
    def index_to_sigma(self, index: torch.Tensor | int) -> torch.Tensor:
        """Map a 0..1000 timestep index to sigma the way this family's scheduler does."""

    @abc.abstractmethod
    def sigma_to_index(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`index_to_sigma` onto the integer grid, as the family's reference code (sigma 0 maps to 0)."""

    @abc.abstractmethod
    def dmd_sigma(self, n: int, rng: torch.Generator, device=None) -> torch.Tensor:
        """Sigmas at which the DMD loss compares teacher and fake score."""

    @abc.abstractmethod
    def fake_score_sigma(self, n: int, rng: torch.Generator, device=None) -> torch.Tensor:
        """Sigmas for the fake score's flow-matching loss (logit-normal, family-shifted)."""

    def fake_score_objective(self, v: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                             sigma: torch.Tensor) -> torch.Tensor:
        """The fake score's loss from its velocity ``v`` at ``x_t = add_noise(x0, noise, sigma)``.

        Default: flow matching with weight 1, ``mean((v - (noise - x0))^2)`` (method notes 1.4). A family whose
        networks predict another quantity returns its own objective (an epsilon family: the epsilon MSE).
        """
        return torch.nn.functional.mse_loss(v, noise - x0)

    #: Per-anchor GAN weightings this family offers (``model.family_kwargs.adversarial_weighting``).
    adversarial_weightings: tuple[str, ...] = ('signal_power',)
    #: The weighting in use; families set it from their ``adversarial_weighting`` argument.
    adversarial_weighting: str = 'signal_power'

    def _set_adversarial_weighting(self, weighting: str) -> None:
        if weighting not in self.adversarial_weightings:
            raise ValueError(f'model.family_kwargs.adversarial_weighting={weighting!r} is not available for family '
                             f'{self.name!r}; choose one of {list(self.adversarial_weightings)}')
        self.adversarial_weighting = weighting

    def adversarial_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample GAN weight at each sample's anchor ``sigma`` (both the generator and the discriminator term).

        ``signal_power``: ``(1 - sigma)^2``, the paper's alpha_t^2 and the reference FLUX code. Families may offer
        others (SD 3.5: ``scheduler_sigma_squared``, the reference SD 3.5 code). Either way GAN feedback matters more
        toward the clean end.
        """
        if self.adversarial_weighting == 'signal_power':
            return (1 - sigma)**2
        return self._adversarial_weight(sigma)

    def _adversarial_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f'{type(self).__name__} has no {self.adversarial_weighting!r} weighting')

    # -- networks -----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity of ``net`` at ``(x, sigma)`` in float32, ``x`` unpacked ``(B, C, h, w)``, ``sigma`` ``(B,)``.

        Args:
            guidance: Per-sample teacher guidance ``(B,)``: the embedded guidance value (FLUX) or the CFG scale
                (SD 3.5, using ``cond['negative_*']`` as the unconditional branch). ``None`` queries the network
                plainly, as for the generator and the fake score.
        """

    def pooled_text_dim(self, teacher_config) -> int:
        """Width of ``cond['pooled_prompt_embeds']``, the text condition of the VFM discriminator's heads. Default: the
        network config's ``pooled_projection_dim`` (FLUX, SD 3.5)."""
        return int(teacher_config.pooled_projection_dim)

    @abc.abstractmethod
    def latent_shape(self, vae: nn.Module, resolution: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a square image of side ``resolution``."""

    def encode_images(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to normalised latents ``(z - shift) * scale`` (posterior mean)."""
        vae_dtype = next(vae.parameters()).dtype
        z = vae.encode(pixels.to(vae_dtype)).latent_dist.mode()
        return ((z.float() - self._shift(vae)) * vae.config.scaling_factor)

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents to pixels in about [-1, 1] (differentiable)."""
        vae_dtype = next(vae.parameters()).dtype
        z = latents / vae.config.scaling_factor + self._shift(vae)
        return vae.decode(z.to(vae_dtype)).sample.float()

    @staticmethod
    def _shift(vae: nn.Module) -> float:
        return float(getattr(vae.config, 'shift_factor', None) or 0.0)

    # -- helpers shared by families -----------------------------------------------------------------------------------

    @staticmethod
    def _as_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0]).to(torch.float32)

    # -- export (senseflow_algos.export; nothing there names a family) -----------------------------------------------

    @abc.abstractmethod
    def export_scheduler(self, base_config: dict[str, Any], sigmas: torch.Tensor, latent_shape: Sequence[int],
                         method: str) -> 'SchedulerExport':
        """The exported student's diffusers scheduler and the call arguments that make its pipeline step through
        ``sigmas`` (the anchors, then 0) with the in-repo sampler ``method``.

        Args:
            base_config (dict): The teacher scheduler's config (``DMDModel.scheduler_config``).
            sigmas (Tensor): Anchors followed by 0 (``DMDModel.sigmas``).
            latent_shape: ``(C, h, w)`` of the latents at the training resolution.
            method (str): ``'renoise'`` (x0, then re-noise with fresh noise: :func:`~senseflow_algos.flow.renoise_step`)
                or ``'euler'`` (:func:`~senseflow_algos.flow.euler_step`); :func:`~senseflow_algos.export.export_pipeline`
                has checked that it is one of the two.

        Raises:
            ExportError: If the scheduler does not reproduce the anchors.
        """

    def pipeline_call_kwargs(self, resolution: int, conditioner: nn.Module) -> dict[str, Any]:
        """The call arguments besides the scheduler's that sample like the in-repo sampler (size, prompt length, no
        guidance)."""
        return {'height': resolution, 'width': resolution,
                'max_sequence_length': int(getattr(conditioner, 'max_sequence_length', self.max_sequence_length))}

    def build_pipeline(self, net: nn.Module, vae: nn.Module, conditioner: nn.Module, scheduler):
        """The diffusers :attr:`pipeline_class` with ``net`` as its network and the conditioner's text components."""
        import diffusers

        parts = {name: getattr(conditioner, name) for name in self.text_components}
        return getattr(diffusers, self.pipeline_class)(scheduler=scheduler, vae=vae, **parts,
                                                       **{self.network_subfolder: net})

    def scheduler_noise(self, shape: Sequence[int], draw: Callable[[Sequence[int]], torch.Tensor]) \
            -> Callable[[], torch.Tensor]:
        """Fresh re-noise noise of the unpacked ``shape``, drawn (``draw(shape)``, as diffusers' ``randn_tensor``) in
        the layout in which the exported pipeline's scheduler draws it, so both consume the random stream alike."""
        return lambda: draw(shape)

    def _flow_match_export(self, base_config: dict[str, Any], sigmas: torch.Tensor, method: str,
                           shift_config: dict[str, Any], unshift: Callable[[torch.Tensor], torch.Tensor],
                           mu: Optional[float] = None) -> 'SchedulerExport':
        """:meth:`export_scheduler` for flow-matching teachers (``FlowMatchEulerDiscreteScheduler``).

        ``step()`` with ``stochastic_sampling=True`` computes ``x0 = x - s v`` and ``(1 - s_next) x0 + s_next * randn``
        (:func:`~senseflow_algos.flow.renoise_step`); with ``False`` the Euler step ``x + (s_next - s) v`` (checked in
        diffusers 0.39's ``scheduling_flow_match_euler_discrete.py``). The pipeline passes pre-shift ``sigmas=``
        (``unshift`` of the anchors) to ``set_timesteps``, which shifts them back with ``shift_config`` (and ``mu``);
        every option that would move the sigmas off the anchors (Karras / exponential / beta sigmas, terminal
        stretch, inversion) is switched off, and the result is checked against the anchors to 1e-5.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = {k: v for k, v in dict(base_config).items() if not k.startswith('_')}
        cfg.update(stochastic_sampling=method == 'renoise', invert_sigmas=False, shift_terminal=None,
                   use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                   time_shift_type='exponential', **shift_config)
        anchors = torch.as_tensor([float(s) for s in sigmas[:-1]], dtype=torch.float64)
        pre = [round(float(p), 6) for p in unshift(anchors)]
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        scheduler.set_timesteps(sigmas=pre, **({'mu': mu} if mu is not None else {}))
        got = scheduler.sigmas.double()
        want = torch.as_tensor([float(s) for s in sigmas], dtype=torch.float64)
        if got.shape != want.shape or (got - want).abs().max() > 1e-5:
            raise ExportError(f'the exported scheduler gives sigmas {got.tolist()} for sigmas={pre}, not the training '
                              f'anchors {want.tolist()}')
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)  # fresh: set_timesteps above changed its state
        return SchedulerExport(scheduler, {'num_inference_steps': len(pre), 'sigmas': pre},
                               {'pipeline_sigmas': pre, 'mu': mu})

    # -- planner (senseflow_algos.plan) --------------------------------------------------------------------------------

    @abc.abstractmethod
    def planner_text_lengths(self, max_sequence_length: int) -> dict[str, int]:
        """Tokens each text encoder of :attr:`text_components` runs at for a prompt (the planner's FLOPs)."""

    @abc.abstractmethod
    def planner_conditioning(self, teacher_config, lengths: dict[str, int], batch: int,
                             dtype: torch.dtype) -> Conditioning:
        """Meta-device conditioning of ``batch`` prompts shaped as the conditioner (or precomputed data) delivers it,
        for text encoders run at ``lengths`` (:meth:`planner_text_lengths`)."""


@dataclass
class SchedulerExport:
    """What :meth:`ModelFamily.export_scheduler` returns.

    Attributes:
        scheduler: The diffusers scheduler the exported pipeline is saved with.
        call_kwargs (dict): Pipeline call arguments that set its steps (``num_inference_steps``, ``sigmas=`` ...).
        info (dict): Recorded in ``senseflow_export.json`` (e.g. ``pipeline_sigmas``, ``mu``).
    """
    scheduler: Any
    call_kwargs: dict[str, Any]
    info: dict[str, Any]

class PackedShiftedFlowFamily(ModelFamily):
    """The schedule FLUX and Qwen-Image share: 2x2-packed latent tokens and a resolution-dependent exponential time
    shift (``mu`` linear in the packed token count, :func:`~senseflow_algos.flow.flux_mu`), sigma = index / 1000 on
    the grid, and plain logit-normal DMD and fake-score sigmas (their schedulers hold unshifted sigmas at init).

    Subclasses call :meth:`_set_shift` in ``__init__`` with their scheduler's shift parameters.
    """

    def _set_shift(self, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> None:
        self.shift_params = dict(base_seq_len=base_seq_len, max_seq_len=max_seq_len, base_shift=base_shift,
                                 max_shift=max_shift)

    def mu(self, latent_hw: tuple[int, int]) -> float:
        """The time-shift exponent at latents of spatial size ``latent_hw`` (``h/2 * w/2`` packed tokens), as the
        pipelines' ``calculate_shift``."""
        from senseflow_algos import flow

        return flow.flux_mu((latent_hw[0] // 2) * (latent_hw[1] // 2), **self.shift_params)

    def _default_anchors(self, latent_hw, num_steps=DEFAULT_NUM_STEPS):
        from senseflow_algos import flow

        mu = self.mu(latent_hw)
        return shifted_anchors(lambda s: flow.flux_time_shift(s, mu), num_steps)

    def index_to_sigma(self, index):
        from senseflow_algos import flow

        return flow.flux_index_to_sigma(index)

    def sigma_to_index(self, sigma):
        # The grid point at or below sigma, as the reference truncates its shifted FLUX anchors (.9045 -> 904); the
        # 1e-6 keeps grid sigmas i/1000 on i despite float rounding.
        return torch.floor(torch.as_tensor(sigma, dtype=torch.float64) * 1000 + 1e-6)

    def dmd_sigma(self, n, rng, device=None):
        from senseflow_algos import flow

        # The scheduler holds unshifted sigmas at init, so the reference samples a plain logit-normal.
        return flow.sample_logit_normal(n, rng, device=device)

    def fake_score_sigma(self, n, rng, device=None):
        from senseflow_algos import flow

        return flow.sample_logit_normal(n, rng, device=device)

    def export_scheduler(self, base_config, sigmas, latent_shape, method):
        # The pipeline computes mu from the image size (calculate_shift) with the scheduler config's parameters: at
        # the training resolution its default linspace(1, 1/n, n) gives the training anchors.
        from senseflow_algos import flow

        p = self.shift_params
        mu = float(self.mu(tuple(latent_shape[1:])))
        return self._flow_match_export(
            base_config, sigmas, method,
            dict(use_dynamic_shifting=True, base_image_seq_len=p['base_seq_len'], max_image_seq_len=p['max_seq_len'],
                 base_shift=p['base_shift'], max_shift=p['max_shift']),
            lambda anchors: flow.flux_time_unshift(anchors, mu), mu=mu)

    def scheduler_noise(self, shape, draw):
        # The pipeline's scheduler steps on packed (B, h/2 * w/2, 4C) tokens and draws its noise in that shape.
        from senseflow_algos import flow

        b, c, h, w = shape
        return lambda: flow.unpack_latents(draw((b, (h // 2) * (w // 2), 4 * c)), c, h, w)


def shifted_anchors(shift_fn, num_steps: int = DEFAULT_NUM_STEPS) -> torch.Tensor:
    """Apply a family's time shift to the ``num_steps`` uniform pre-shift times (:func:`flow.uniform_times`)."""
    from senseflow_algos import flow

    return shift_fn(flow.uniform_times(num_steps))

