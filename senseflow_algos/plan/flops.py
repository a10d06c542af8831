"""FLOPs of one generator update: the network passes of a TTUR cycle (``gen_every`` batches, the first with a
generator phase), counted from the training loop, times the FLOPs of each pass measured on meta tensors.

One cycle, per device and micro-batch (``p`` = ``backsim_prob``, 1 without real images; ``k`` = the
backward-simulation anchor, uniform over the 4 anchors, so ``E[k] = 1.5``):

=====================  =========================================================================================
every batch            text encoders once when online (SD 3.5: prompt and empty prompt); the generator input:
                       ``k`` generator forwards with probability ``p``, else one VAE encode when images are online;
                       one generator step (with gradient on the generator batch); the fake score's own loss
                       (forward + backward); VFM: reference features (backbone, no grad), one VAE decode, the
                       backbone on the fake and the real images and the heads on both (forward + backward)
generator batch only   DMD: guided teacher + fake score forwards; ISG: guided teacher + generator forwards; VFM:
                       the decode, the backbone and the heads again with gradient to the generator
=====================  =========================================================================================

``bench/step_cost.py`` counts the real passes of the tiny config and agrees with :func:`cycle_passes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from senseflow_algos.plan.metarun import PassCost
from senseflow_algos.plan.passes import PassCosts
from senseflow_algos.plan.settings import RunSettings
from senseflow_algos.signatures import defaults_of

__all__ = ['Draw', 'CyclePasses', 'cycle_passes', 'CycleFlops', 'cycle_flops', 'expected_draws']


@dataclass(frozen=True)
class Draw:
    """One batch's generator-input draw: backward simulation (with weight ``weight``) from anchor ``k``, or not."""
    backsim: bool
    k: float = 0.0
    weight: float = 1.0


@dataclass
class CyclePasses:
    """How many times one TTUR cycle runs each pass (forwards and backwards per network, per micro-batch)."""
    counts: dict[str, tuple[float, float]] = field(default_factory=dict)  # network -> (forwards, backwards)

    def add(self, name: str, forwards: float = 0.0, backwards: float = 0.0) -> None:
        f, b = self.counts.get(name, (0.0, 0.0))
        self.counts[name] = (f + forwards, b + backwards)


def expected_draws(settings: RunSettings, num_anchors: int) -> list[Draw]:
    """The expectation over the generator-input draws of one cycle (each batch: backward simulation with
    probability ``backsim_prob``, from anchor ``k`` uniform in ``0..num_anchors-1``)."""
    p = settings.backsim_prob if settings.has_real_data else 1.0
    # A fractional draw: backward simulation with weight p, from the mean anchor.
    return [Draw(True, (num_anchors - 1) / 2, p)] * settings.gen_every


def _vfm_defaults() -> dict:
    from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator

    return defaults_of(VFMDiscriminator)


def cycle_passes(settings: RunSettings, draws: Sequence[Draw], online_images: bool, has_vfm: bool) -> CyclePasses:
    """Pass counts of one cycle for the given draws (one per batch; the first batch is the generator batch).

    The text encoders run once per batch on its prompts; a CFG teacher's constant unconditional prompt is encoded
    once per run (``ConstantPromptCache``), which no cycle pays.

    ``has_vfm``: the VFM discriminator is on; its generator term (decode, backbone and heads with gradient to the
    generator) runs only with ``generator_weight > 0``.
    """
    vfm_generator = has_vfm and float({**_vfm_defaults(), **(settings.vfm or {})}['generator_weight']) > 0
    passes = CyclePasses()
    for i, draw in enumerate(draws):
        generator_batch = i == 0
        if settings.text_encoders and not settings.precomputed:
            passes.add('text_encoders', 1)
        backsim = draw.weight if draw.backsim else 0.0
        passes.add('generator', backsim * draw.k)
        if online_images:
            passes.add('vae_encoder', 1.0 - backsim)
        passes.add('generator', 1, 1 if generator_batch else 0)
        passes.add('fake_score', 1, 1)
        if generator_batch:
            passes.add('teacher', 1)
            passes.add('fake_score', 1)
            if settings.isg:
                passes.add('teacher', 1)
                passes.add('generator', 1)
        if has_vfm:
            passes.add('vfm_backbone', 3)  # reference, fake, real
            passes.add('vfm_heads_critic', 2, 2)
            passes.add('vae_decoder', 1)
            if generator_batch and vfm_generator:
                passes.add('vfm_backbone', 1, 1)
                passes.add('vfm_heads_generator', 1, 1)
                passes.add('vae_decoder', 0, 1)
    return passes


@dataclass
class CycleFlops:
    """FLOPs of one cycle per device, by network: ``model`` (forward + backward) and ``recompute`` (the extra
    forwards activation checkpointing runs)."""
    model: dict[str, float]
    recompute: dict[str, float]
    passes: CyclePasses

    @property
    def total_model(self) -> float:
        return sum(self.model.values())

    @property
    def total_recompute(self) -> float:
        return sum(self.recompute.values())


def _pass_for(name: str, costs: PassCosts) -> Optional[PassCost]:
    return {'generator': costs.generator, 'fake_score': costs.generator, 'teacher': costs.teacher,
            'vae_encoder': costs.vae_encode, 'vae_decoder': costs.vae_decode, 'vfm_backbone': costs.backbone,
            'vfm_heads_generator': costs.heads_generator, 'vfm_heads_critic': costs.heads_critic}.get(name)


def cycle_flops(passes: CyclePasses, costs: PassCosts, checkpointed: Sequence[str] = ()) -> CycleFlops:
    """FLOPs of the cycle from pass counts and measured passes.

    Args:
        checkpointed: Networks whose checkpointable units recompute their forward once per backward.
    """
    model, recompute = {}, {}
    for name, (forwards, backwards) in passes.counts.items():
        if name == 'text_encoders':
            model[name] = forwards * sum(c.forward_flops for c in (costs.text_encoders or {}).values())
            continue
        cost = _pass_for(name, costs)
        if cost is None:
            raise ValueError(f'no measured pass for {name}')
        model[name] = forwards * cost.forward_flops + backwards * cost.backward_flops
        recompute[name] = backwards * cost.unit_forward_flops if name in checkpointed else 0.0
    return CycleFlops(model, recompute, passes)
