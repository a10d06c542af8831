"""Planned FLOPs equal ``FlopCounterMode`` on a real training run of the tiny configs.

The real side trains the tiny config on the CPU under ``FlopCounterMode`` (every matmul, convolution and attention of
the whole loop: text encoders, VAE, teacher, generator, fake score, VFM backbone and heads, forward and backward) and
records each batch's generator-input draw and each network's forward/backward count with bench/step_cost.py's
``PassCounter``. The plan side multiplies the pass counts of its loop model for those draws by passes measured once
on the meta device. CPU attention runs ``_scaled_dot_product_flash_attention_for_cpu``, which torch's counter does
not list; it is counted with torch's own formulas for the flash kernels (the planner models GPU flash attention).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.flop_counter as flop_counter

from senseflow_algos.config import load_config
from senseflow_algos.plan.flops import Draw, cycle_flops, cycle_passes, expected_draws
from senseflow_algos.plan.networks import build_meta_model
from senseflow_algos.plan.passes import measure_passes
from senseflow_algos.plan.planner import cast_to_compute
from senseflow_algos.plan.settings import read_run_settings

REPO = Path(__file__).resolve().parents[2]
aten = torch.ops.aten


def _flash_forward(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


CPU_FLASH = {aten._scaled_dot_product_flash_attention_for_cpu: _flash_forward,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward}


def _real_run(cfg):
    sys.path.insert(0, str(REPO / 'bench'))
    from step_cost import PassCounter

    from senseflow_algos.builders import build_trainer

    trainer = build_trainer(cfg)
    model = trainer.state.model
    networks = {'generator': model.generator, 'teacher': model.teacher, 'fake_score': model.fake_score,
                'vae_encoder': model.vae.encoder, 'vae_decoder': model.vae.decoder, 'vfm_backbone': model.vfm_backbone,
                'vfm_heads': model.discriminator}
    networks.update({name: m for name, m in model.conditioner.named_children()})
    counter = PassCounter(networks)
    trainer.state.callbacks.append(counter)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_FLASH) as flops:
        trainer.fit()
    trainer.close()
    return flops.get_total_flops(), counter


@pytest.mark.parametrize('config', ['tiny_flux', 'tiny_sd35', 'tiny_sdxl'])
def test_planned_flops_equal_flopcounter_on_real_tensors(config):
    gen_every, cycles = 2, 2
    cfg = load_config(REPO / 'yamls' / f'{config}.yaml', [
        'trainer.progress_bar=false', f'model.gen_every={gen_every}', f'trainer.max_duration={gen_every * cycles}ba',
        'dataset.global_batch_size=2', 'callbacks=null'])
    real, counter = _real_run(cfg)
    settings = read_run_settings(cfg)
    meta = build_meta_model(settings)
    with cast_to_compute(meta, settings):
        costs = measure_passes(meta, settings, batch=2)
    planned, counts = 0, {}
    for c in range(cycles):
        draws = [Draw(backsim, k) for backsim, k in counter.draws[c * gen_every:(c + 1) * gen_every]]
        passes = cycle_passes(settings, draws, online_images=True, has_vfm=True)
        planned += cycle_flops(passes, costs).total_model
        for name, (f, b) in passes.counts.items():
            counts[name] = (counts.get(name, (0, 0))[0] + f, counts.get(name, (0, 0))[1] + b)
    # SD 3.5's empty prompt (its CFG branch) is encoded once in the run, as one prompt: half a batch of 2.
    once = config == 'tiny_sd35'
    planned += once * sum(c.forward_flops for c in costs.text_encoders.values()) / 2
    assert int(planned) == real, f'planned {planned:.0f} FLOPs, FlopCounterMode {real}'
    # The loop model's pass counts are the passes that ran.
    heads = tuple(a + b for a, b in zip(counts.pop('vfm_heads_generator'), counts.pop('vfm_heads_critic')))
    text = counts.pop('text_encoders')[0]
    measured_text = sum(counter.forward[n] for n in counter.forward if n.startswith('text_encoder'))
    assert measured_text == (text + once) * len([n for n in counter.forward if n.startswith('text_encoder')])
    counts['vfm_heads'] = heads
    for name, (f, b) in counts.items():
        assert (counter.forward[name], counter.backward[name]) == (f, b), name


def test_expected_draws_average_every_equally_likely_draw():
    """The plan's expected cycle equals the probability-weighted average of cycle_passes over every draw sequence."""
    cfg = load_config(REPO / 'yamls' / 'tiny_flux.yaml', ['model.gen_every=2', 'model.backsim_prob=0.25'])
    settings = read_run_settings(cfg)
    anchors = 4
    outcomes = [(Draw(True, k), 0.25 / anchors) for k in range(anchors)] + [(Draw(False), 0.75)]
    average: dict[str, list[float]] = {}
    for sequence in itertools.product(outcomes, repeat=settings.gen_every):
        weight = 1.0
        for _, p in sequence:
            weight *= p
        passes = cycle_passes(settings, [d for d, _ in sequence], True, True)
        for name, (f, b) in passes.counts.items():
            acc = average.setdefault(name, [0.0, 0.0])
            acc[0] += weight * f
            acc[1] += weight * b
    expected = cycle_passes(settings, expected_draws(settings, anchors), True, True)
    assert set(expected.counts) == set(average)
    for name, (f, b) in expected.counts.items():
        assert f == pytest.approx(average[name][0]) and b == pytest.approx(average[name][1]), name
