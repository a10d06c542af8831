"""DMD (distribution matching distillation, DMD2 flavour) as a Composer model.

One training batch runs in phases driven by :class:`~senseflow_algos.optim.PhasedAdamW`:

* ``generator`` (every ``gen_every`` batches): the generator takes one step with gradient at anchor ``k`` from a
  backward-simulated or a forward-noised input, and the DMD loss pushes its x0 toward the teacher's and away from
  the fake score's denoised estimate.
* ``critic`` (every batch): the fake score learns the generator's current distribution by flow matching on the
  detached sample (the one the generator phase produced, if there was one).

Algorithms (IDA, ISG, the VFM discriminator) hook Composer events around these phases; they read
``model.phase`` (a :class:`~senseflow_algos.optim.TrainingPhase`) and the
:class:`~senseflow_algos.models.step.GeneratorStep` this model returns as ``state.outputs``.

Randomness comes from ``torch.Generator`` streams seeded by ``(seed, rank, batches_seen, purpose)``; ``batches_seen``
is a buffer, so a resumed run draws exactly the noise the uninterrupted run would have drawn. (Checkpoints written
before it was renamed call it ``ttur_step``; loading renames the key.)
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Optional, Sequence

import torch
from composer.models import ComposerModel
from composer.utils import dist

from senseflow_algos import flow, limits
from senseflow_algos.models.families import DEFAULT_NUM_STEPS, Components, Conditioning, ModelFamily
from senseflow_algos.models.step import GeneratorStep
from senseflow_algos.optim import Phase, TrainingPhase

__all__ = ['DMDModel', 'GENERATOR_PHASE', 'CRITIC_PHASE', 'sample_uniform']

#: The generator phase and the roles it updates.
GENERATOR_PHASE = Phase(TrainingPhase.GENERATOR, ('generator',))
#: The critic phase (fake score and discriminator heads) and the roles it updates.
CRITIC_PHASE = Phase(TrainingPhase.CRITIC, ('fake_score', 'discriminator'))

def sample_uniform(bounds: Sequence[float], n: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` draws from U(lo, hi) (float32, on ``rng``'s device); ``lo == hi`` gives a constant."""
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo + (hi - lo) * torch.rand(n, generator=rng, device=rng.device)


def _stream_seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


class DMDModel(ComposerModel):
    """Generator, fake score and frozen teacher, VAE and text encoders for DMD distillation.

    Args:
        family (ModelFamily): Teacher family (FLUX, SD 3.5, ...).
        components (Components): Loaded networks. The generator is ``components.student``; the fake score is a
            copy of it.
        resolution (int): Square image side the model trains at (sets latent shape and FLUX's anchor shift).
        gen_every (int): TTUR: the generator steps on every ``gen_every``-th batch, the fake score on every batch.
            Default: ``5``.
        backsim_prob (float): Probability that a batch's generator input is backward-simulated rather than real
            latents noised to the anchor (always backward simulation when the batch has no images). Default: ``0.5``.
        dmd_guidance (tuple[float, float], optional): Teacher guidance for the DMD real score, drawn per sample from
            U(lo, hi): embedded guidance for FLUX (1, 8), CFG scale for SD 3.5 (Large 3..10, Medium 2..8). Default:
            the family's ``defaults.dmd_guidance``.
        seed (int): Seed of the noise streams. Default: ``0``.
        num_steps (int): Sampling steps of the student = number of anchors, the family's shift of
            ``[1, (n-1)/n, ..., 1/n]``. Default: ``4`` (the paper's).
    """

    def __init__(self, family: ModelFamily, components: Components, resolution: int, gen_every: int = 5,
                 backsim_prob: float = 0.5, dmd_guidance: Optional[Sequence[float]] = None, seed: int = 0,
                 num_steps: int = DEFAULT_NUM_STEPS):
        super().__init__()
        limits.check('model.num_steps', num_steps)
        limits.check('model.gen_every', gen_every)
        limits.check('model.backsim_prob', backsim_prob)
        self.family = family
        self.generator = components.student.train()
        self.fake_score = copy.deepcopy(components.student).train()
        self.teacher = components.teacher.requires_grad_(False).eval()
        self.vae = components.vae.requires_grad_(False).eval()
        # No conditioner (``model.text_encoders: false``): batches must carry precomputed embeddings.
        self.conditioner = None if components.conditioner is None else components.conditioner.requires_grad_(
            False).eval()
        #: Children that are frozen: kept in eval mode and out of checkpoints (algorithms may add their own).
        self.frozen_modules: list[str] = ['teacher', 'vae'] + (['conditioner'] if self.conditioner is not None else [])
        self.scheduler_config = components.scheduler_config
        self.resolution = resolution
        self.gen_every = gen_every
        self.backsim_prob = backsim_prob
        self.dmd_guidance = tuple(float(g) for g in (family.defaults.dmd_guidance if dmd_guidance is None
                                                     else dmd_guidance))
        self.seed = seed
        self.latent_shape = family.latent_shape(self.vae, resolution)
        #: Generator sigmas (float64, CPU) followed by the end point 0.
        self.sigmas = flow.append_zero(family.anchors(self.latent_shape[1:], int(num_steps)))
        self.num_anchors = len(self.sigmas) - 1
        # Batches trained so far: drives the TTUR cadence and seeds the noise; checkpointed with the model.
        self.register_buffer('batches_seen', torch.zeros((), dtype=torch.long))
        #: Phase of the closure that runs (or ran last); the critic phase between batches.
        self.phase: TrainingPhase = TrainingPhase.CRITIC
        self.phase_active = False
        self.generator_stepped = False
        self._sample_cache: list[GeneratorStep] = []
        self._weighted_terms: dict[str, torch.Tensor] = {}
        self._streams: dict[tuple[str, bool], torch.Generator] = {}
        # Frozen networks are rebuilt from the teacher weights at start-up: keep them out of checkpoints (except
        # while FSDP2 broadcasts rank 0's weights at a lean start: models/fsdp.py sets this flag then).
        self.keep_frozen_in_state_dict = False
        self._register_state_dict_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_keys)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)  # checkpoints of earlier versions

    # -- Composer plumbing --------------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """Composer calls ``model.train()`` on every child; frozen networks stay in eval mode."""
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Role-tagged parameter groups for :class:`~senseflow_algos.optim.PhasedAdamW`."""
        return [
            {'params': [p for p in self.generator.parameters() if p.requires_grad], 'role': 'generator'},
            {'params': [p for p in self.fake_score.parameters() if p.requires_grad], 'role': 'fake_score'},
        ]

    def clip_grad_norm(self, role: str, max_norm: float) -> bool:
        """Clip the gradients of ``role``'s network if it is an FSDP1 root (whose norm spans all shards).

        Each role is the child of the same name. Returns ``False`` when it is not FSDP1-wrapped, so the optimizer clips
        its parameters directly (plain tensors, or FSDP2 DTensors whose norm torch already reduces across shards).
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        net = getattr(self, role, None)
        if isinstance(net, FullyShardedDataParallel):
            net.clip_grad_norm_(max_norm)
            return True
        return False

    @property
    def device(self) -> torch.device:
        return self.batches_seen.device

    # -- phases (PhaseController) -------------------------------------------------------------------------------------

    def is_generator_batch(self) -> bool:
        """Whether the current batch has a generator phase (TTUR)."""
        return int(self.batches_seen) % self.gen_every == 0

    def training_phases(self) -> list[Phase]:
        return [GENERATOR_PHASE, CRITIC_PHASE] if self.is_generator_batch() else [CRITIC_PHASE]

    def begin_phase(self, phase: Phase) -> None:
        self.phase = phase.kind
        self.phase_active = True

    def end_phase(self, phase: Phase) -> None:
        if phase.kind is TrainingPhase.GENERATOR:
            self.generator_stepped = True

    def end_batch(self) -> None:
        self.batches_seen += 1
        self.phase = TrainingPhase.CRITIC
        self.phase_active = False
        self.generator_stepped = False
        self._sample_cache.clear()
        self._streams.clear()

    # -- randomness ---------------------------------------------------------------------------------------------------

    def rng(self, purpose: str, per_rank: bool = True) -> torch.Generator:
        """The batch's random stream for ``purpose``, seeded by ``(seed, rank, batches_seen, purpose)``.

        Each purpose (generator input, DMD noise, an algorithm's draws, ...) has its own stream, so enabling an
        algorithm or reordering them never changes another component's noise. ``per_rank=False`` gives the same
        draws on every rank (e.g. the backward-simulation anchor shared by the whole global batch).
        """
        key = (purpose, per_rank)
        if key not in self._streams:
            rank = dist.get_global_rank() if per_rank else -1
            rng = torch.Generator(device=self.device)
            rng.manual_seed(_stream_seed(self.seed, rank, int(self.batches_seen), purpose))
            self._streams[key] = rng
        return self._streams[key]

    # -- data ---------------------------------------------------------------------------------------------------------

    def conditioning(self, batch: dict[str, Any]) -> Conditioning:
        """Precomputed embeddings from the batch if present, else the frozen text encoders on ``batch['prompt']``."""
        if 'prompt_embeds' in batch:
            cond = {k: batch[k] for k in self._conditioning_shapes() if k in batch}
            self._check_embeddings(cond)
            return cond
        if self.conditioner is None:
            raise KeyError("the batch has no precomputed 'prompt_embeds' and this model has no text encoders "
                           '(built with model.text_encoders=false): train on dataset.kind=precomputed data (see '
                           f'data_prep/precompute.py) or set model.text_encoders=true (batch keys: {sorted(batch)})')
        if 'prompt' not in batch:
            raise KeyError(f"batch has neither 'prompt' nor precomputed 'prompt_embeds' (keys: {sorted(batch)})")
        return self.conditioner(list(batch['prompt']))

    def _conditioning_shapes(self) -> Conditioning:
        """The family's conditioning for one prompt on the meta device: the keys a batch may carry precomputed and
        their shapes (:meth:`~senseflow_algos.models.families.ModelFamily.planner_conditioning`), built once."""
        if getattr(self, '_precomputed_shapes', None) is None:  # fixed by family and teacher: not per batch
            family = self.family
            lengths = family.planner_text_lengths(family.max_sequence_length)
            self._precomputed_shapes = family.planner_conditioning(self.teacher.config, lengths, 1, torch.float32)
        return self._precomputed_shapes

    def _check_embeddings(self, cond: Conditioning) -> None:
        """Precomputed embeddings must fit the teacher: the rank and (but for masks and token counts) the width of
        each tensor the family's conditioning has."""
        for key, want in self._conditioning_shapes().items():
            value = cond.get(key)
            if value is None:
                continue
            width_fits = key.endswith('_mask') or value.shape[-1] == want.shape[-1]
            if value.ndim != want.ndim or not width_fits:
                shape = ', '.join(['batch', *(['tokens'] if want.ndim == 3 else []), str(want.shape[-1])])
                raise ValueError(f'precomputed {key} has shape {tuple(value.shape)} but the {self.family.name} '
                                 f'teacher takes ({shape}): the data was precomputed for another family or model')
        if 'pooled_prompt_embeds' not in cond:
            raise KeyError("precomputed conditioning has 'prompt_embeds' but no 'pooled_prompt_embeds'")

    def real_latents(self, batch: dict[str, Any]) -> Optional[torch.Tensor]:
        """Latents of the batch's real images (precomputed ``latents`` or VAE-encoded ``image``), else ``None``."""
        if 'latents' in batch:
            latents = batch['latents']
            if tuple(latents.shape[1:]) != tuple(self.latent_shape):
                raise ValueError(f'precomputed latents have shape {tuple(latents.shape[1:])} per sample but this '
                                 f'model trains at resolution {self.resolution} with latents {self.latent_shape}: '
                                 'precompute at the training resolution with the same VAE')
            return latents.float()
        if 'image' in batch:
            if getattr(self.vae, 'encoder', None) is None:
                raise RuntimeError("the batch has images but no precomputed 'latents', and the VAE encoder was not "
                                   'loaded (model.vae_encoder=false): train on dataset.kind=precomputed data with '
                                   'latents or set model.vae_encoder=true')
            with torch.no_grad():
                return self.family.encode_images(self.vae, batch['image'])
        return None

    @staticmethod
    def batch_size(batch: dict[str, Any]) -> int:
        for key in ('prompt_embeds', 'latents', 'image'):
            if key in batch:
                return batch[key].shape[0]
        return len(batch['prompt'])

    # -- generator ----------------------------------------------------------------------------------------------------

    def generator_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.family.velocity(self.generator, x, sigma, cond)

    def generator_pass(self, batch: dict[str, Any], with_grad: bool) -> GeneratorStep:
        """Pick the generator input (backward simulation or noised real latents) and take one generator step.

        Returns:
            GeneratorStep: The step, for the generator phase if ``with_grad`` else for the critic phase.
        """
        cond = self.conditioning(batch)
        n = self.batch_size(batch)
        shape = (n, *self.latent_shape)
        shared, own = self.rng('generator_input', per_rank=False), self.rng('generator_input')

        def noise():
            return flow.sample_noise(shape, own, device=self.device)

        has_real = 'latents' in batch or 'image' in batch
        backsim = not has_real or torch.rand(1, generator=shared, device=shared.device).item() < self.backsim_prob
        if backsim:
            # One anchor for the whole (global) batch, as in DMD2.
            k = int(torch.randint(self.num_anchors, (1,), generator=shared, device=shared.device))
            with torch.no_grad():
                x_t = flow.backward_simulation(lambda x, s: self.generator_velocity(x, s, cond), noise,
                                               self.sigmas, k)
            index = torch.full((n,), k, dtype=torch.long, device=self.device)
        else:
            # Real latents only when they are used: no VAE encode on backward-simulation batches.
            real = self.real_latents(batch)
            index = torch.randint(self.num_anchors, (n,), generator=own, device=self.device)
            x_t = flow.add_noise(real, noise(), self.sigmas.to(self.device)[index].float())
        sigma = self.sigmas.to(self.device)[index].float()
        with torch.set_grad_enabled(with_grad):
            v = self.generator_velocity(x_t, sigma, cond)
            x0 = flow.x0_from_velocity(x_t, v, sigma)
        return GeneratorStep(
            phase=TrainingPhase.GENERATOR if with_grad else TrainingPhase.CRITIC,
            x_t=x_t,
            sigma=sigma,
            sigma_next=self.sigmas.to(self.device)[index + 1].float(),
            anchor_index=index,
            velocity=v,
            x0=x0,
            cond=cond,
            backward_simulation=backsim,
        )

    # -- ComposerModel ------------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> GeneratorStep:
        """The generator step of the current phase (Composer's ``state.outputs``).

        The generator phase takes a step with gradient (and keeps it for the critic); the critic phase gets a detached
        copy of that step (its :attr:`~GeneratorStep.scratch` included), or, on a batch without a generator phase, a
        step taken without gradient.
        """
        if not self.phase_active:
            raise RuntimeError('DMDModel trains inside PhasedAdamW.step(closure), which sets the phase; this forward '
                               'ran outside it (an optimizer other than PhasedAdamW, or precision amp_fp16, which '
                               'steps without a closure). Use precision fp32 or amp_bf16 and PhasedAdamW.')
        if self.phase is TrainingPhase.GENERATOR:
            step = self.generator_pass(batch, with_grad=True)
            self._sample_cache.append(step)
            return step
        if self._sample_cache:
            # The critic learns from the sample of this iteration's generator phase (pre-update generator).
            return self._sample_cache.pop(0).detached(TrainingPhase.CRITIC)
        return self.generator_pass(batch, with_grad=False)

    def loss(self, outputs: GeneratorStep, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The DMD loss of a generator-phase step, the fake score's flow matching loss of a critic-phase step."""
        if outputs.phase is TrainingPhase.GENERATOR:
            name, value = 'generator/dmd', self.dmd_loss(outputs.x0, outputs.cond)
        else:
            name, value = 'fake_score/flow_matching', self.fake_score_loss(outputs.x0, outputs.cond)
        self._weighted_terms = {name: value}
        return {'total': value, name: value}

    def add_loss_term(self, loss: dict[str, torch.Tensor], name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add ``weight * value`` to this phase's backpropagated ``loss['total']`` and log ``value`` as ``name``.

        Algorithms call this at ``Event.AFTER_LOSS``. The total is re-summed in name order, so the result (and the
        autograd graph) does not depend on the order in which algorithms run.
        """
        if name in self._weighted_terms:
            raise ValueError(f'loss term {name!r} was added twice in one phase')
        self._weighted_terms[name] = weight * value
        loss[name] = value.detach()
        loss['total'] = sum(self._weighted_terms[k] for k in sorted(self._weighted_terms))

    def dmd_loss(self, x0: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """DMD loss: noise x0 to a fresh sigma; teacher (guided) and fake score (unguided) denoise it."""
        rng = self.rng('dmd')
        n = x0.shape[0]
        sigma = self.family.dmd_sigma(n, rng, device=self.device).float()
        with torch.no_grad():
            x_t = flow.add_noise(x0.detach(), flow.sample_noise(x0.shape, rng, device=self.device), sigma)
            guidance = sample_uniform(self.dmd_guidance, n, rng)
            x0_real = flow.x0_from_velocity(x_t, self.family.velocity(self.teacher, x_t, sigma, cond, guidance), sigma)
            x0_fake = flow.x0_from_velocity(x_t, self.family.velocity(self.fake_score, x_t, sigma, cond), sigma)
        return flow.dmd_loss(x0, x0_real, x0_fake)

    def fake_score_loss(self, x0: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The fake score's denoising loss on the detached generator sample (the family's objective: flow matching
        with weight 1 at logit-normal sigma for FLUX and SD 3.5)."""
        rng = self.rng('fake_score')
        x0 = x0.detach()
        sigma = self.family.fake_score_sigma(x0.shape[0], rng, device=self.device).float()
        noise = flow.sample_noise(x0.shape, rng, device=self.device)
        x_t = flow.add_noise(x0, noise, sigma)
        v = self.family.velocity(self.fake_score, x_t, sigma, cond)
        return self.family.fake_score_objective(v, noise, x0, x_t, sigma)

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.generator_pass(batch, with_grad=False)

    def get_metrics(self, is_train: bool = False):
        return {}


#: State-dict keys of checkpoints written by earlier versions -> their current names.
LEGACY_KEYS = {'ttur_step': 'batches_seen'}


def _rename_legacy_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
    """Load-state-dict pre-hook: rename the keys of older checkpoints (:data:`LEGACY_KEYS`) in place."""
    for old, new in LEGACY_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _frozen(module: DMDModel, key: str, prefix: str = '') -> bool:
    return not module.keep_frozen_in_state_dict and any(
        key.startswith(f'{prefix}{name}.') for name in module.frozen_modules)


def _drop_frozen_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if _frozen(module, k, prefix)]:
        del state_dict[key]


def _allow_missing_frozen_keys(module, incompatible_keys):
    for key in [k for k in incompatible_keys.missing_keys if _frozen(module, k)]:
        incompatible_keys.missing_keys.remove(key)
