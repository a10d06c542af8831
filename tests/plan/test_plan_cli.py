"""The planner's command line, its weights for an unsharded run against the real modules, its search for a change that
fits, and the sharding Composer ends up with for the 64-GPU run files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from senseflow_algos.config import load_config
from senseflow_algos.plan.__main__ import main
from senseflow_algos.plan.planner import Hardware, PlanCache, find_fix, plan_run
from senseflow_algos.plan.settings import read_run_settings
from senseflow_algos.plan.sharding import resolve_sharding

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / 'yamls' / 'tiny_flux.yaml')
CACHE = PlanCache()  # the tiny model's meta build and measured passes, shared by these tests


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_unsharded_weights_and_adam_state_equal_the_real_modules():
    """Without FSDP every GPU holds every network: the plan's bytes are those of the real (CPU) tiny modules, and
    AdamW keeps two moments of each trainable parameter's shape and dtype (torch.optim.AdamW)."""
    from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator
    from senseflow_algos.builders import build_model

    cfg = load_config(TINY)
    plan = plan_run(cfg, Hardware(gpus=1, reserve=0), CACHE)
    real = build_model(cfg['model'], seed=cfg['seed'])
    vfm = VFMDiscriminator(**cfg['algorithms']['vfm_discriminator'])
    backbone = vfm.build_backbone()
    heads = vfm.build_heads(backbone, int(real.teacher.config.pooled_projection_dim))
    modules = {'teacher': real.teacher, 'generator': real.generator, 'fake_score': real.fake_score, 'vae': real.vae,
               'vfm_backbone': backbone, 'discriminator': heads,
               **{f'conditioner.{n}': m for n, m in real.conditioner.named_children()}}
    assert plan.gpu.weights_by_network == {name: _bytes(m) for name, m in modules.items()}
    trainable = sum(p.numel() * p.element_size() for m in (real.generator, real.fake_score, heads)
                    for p in m.parameters() if p.requires_grad)
    assert plan.gpu.optimizer == 2 * trainable
    # An export (senseflow_algos.restore) holds the generator, VAE and text encoders; it used to rebuild the model.
    encoders = _bytes(real.vae) + _bytes(real.conditioner)
    assert plan.host.export == _bytes(real.generator) + encoders
    assert plan.host.export_whole_model == _bytes(real.teacher) + 2 * _bytes(real.generator) + encoders


def test_cli_prints_the_plan(capsys):
    assert main([TINY, '--gpus', '1', '--no-fix']) == 0
    out = capsys.readouterr().out
    for section in ('Networks', 'Per GPU (rank 0)', 'Host RAM per node at start-up', 'FLOPs per generator update',
                    'Verdict: fits'):
        assert section in out
    assert re.search(r'generator\s+FluxTransformer2DModel', out)


def test_cli_names_a_bad_key_and_an_impossible_batch(capsys):
    assert main([TINY, 'model.gen_evry=3']) == 2
    assert 'model.gen_evry' in capsys.readouterr().err
    assert main([TINY, '--gpus', '3', '--no-fix']) == 1
    assert 'dataset.global_batch_size=2 is not a positive multiple of the 3 GPUs' in capsys.readouterr().out


def test_fix_is_the_first_candidate_whose_plan_fits():
    fsdp = 'trainer.parallelism_config={fsdp: {sharding_strategy: FULL_SHARD}}'
    cfg = load_config(TINY, [fsdp])
    cache = CACHE
    base = plan_run(cfg, Hardware(gpus=2, gpu_memory=1, reserve=0), cache)
    # A GPU just too small for the plan as configured: some change must bring it under.
    hardware = Hardware(gpus=2, gpu_memory=base.peak - 1, reserve=0)
    plan = plan_run(cfg, hardware, cache)
    assert not plan.fits
    fix = find_fix(cfg, plan, cache)
    assert fix is not None and fix.plan.fits and fix.plan.peak < plan.peak
    tried = [c.label for c in plan.candidates]
    assert tried[-1] == fix.label and not any(c.plan.fits for c in plan.candidates[:-1])
    # The fix is a real config change: planning the overrides from scratch gives the same peak.
    again = plan_run(load_config(TINY, [fsdp, *fix.overrides]),
                     Hardware(gpus=fix.gpus or 2, gpu_memory=hardware.gpu_memory, reserve=0,
                              fsdp_version=fix.plan.hardware.fsdp_version), cache)
    assert again.peak == fix.plan.peak


def _run_file_overrides(name: str) -> tuple[str, list[str], int]:
    run = yaml.safe_load((REPO / 'yamls' / 'mcli' / name).read_text())
    words = shlex.split(run['command'].replace('\\\n', ' ').split('composer train.py', 1)[1])
    return words[0], [w for w in words[1:] if '=' in w and not w.startswith(('run_name', 'trainer.save_folder'))], \
        run['compute']['gpus']


@pytest.mark.parametrize('name', ['flux-64gpu.yaml', 'sd35-large-64gpu.yaml'])
def test_64_gpu_run_files_shard_within_a_node(name):
    """The hybrid-sharding overrides give Composer a 2-D mesh: shards of 8 ranks (one node), replicated across 8."""
    config, overrides, gpus = _run_file_overrides(name)
    settings = read_run_settings(load_config(REPO / config, overrides))
    sharding = resolve_sharding(settings, world=gpus, gpus_per_node=8, version=1)
    assert (sharding.strategy, sharding.shard_degree, gpus) == ('HYBRID_SHARD', 8, 64)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['flux-64gpu.yaml', 'sd35-large-64gpu.yaml'])
def test_64_gpu_run_files_fit_80gb(name):
    """The plan of each 64-GPU run file (hybrid sharding, global batch 64) fits an 80 GB GPU."""
    config, overrides, gpus = _run_file_overrides(name)
    plan = plan_run(load_config(REPO / config, overrides), Hardware(gpus=gpus))
    assert plan.sharding.strategy == 'HYBRID_SHARD' and plan.fits, plan.problems


def test_hybrid_shard_without_a_2d_mesh_is_full_shard():
    """Composer 0.32.1 turns HYBRID_SHARD on a 1-D mesh into FULL_SHARD; the plan says so and shards over all."""
    cfg = load_config(TINY, ['trainer.parallelism_config={fsdp: {sharding_strategy: HYBRID_SHARD}}'])
    sharding = resolve_sharding(read_run_settings(cfg), world=16, gpus_per_node=8, version=1)
    assert (sharding.strategy, sharding.shard_degree) == ('FULL_SHARD', 16)
    assert any('falls back to FULL_SHARD' in n for n in sharding.notes)


def test_gan_path_checkpointing_flags_change_only_the_configured_activations():
    """The decoder and backbone passes are measured unwrapped whatever the flags (the VFM discriminator switches the
    VAE's own checkpointing on), so the flags move the configured estimate and nothing else."""
    plans = {}
    for flag in ('true', 'false'):
        cfg = load_config(TINY, [f'algorithms.vfm_discriminator.grad_checkpointing={flag}',
                                 f'algorithms.vfm_discriminator.decoder_grad_checkpointing={flag}'])
        plans[flag] = plan_run(cfg, Hardware(gpus=1), CACHE).gpu.phases['generator']
    on, off = plans['true'], plans['false']
    assert on.activations_no_checkpointing == off.activations_no_checkpointing == off.activations
    assert on.activations_all_checkpointing == off.activations_all_checkpointing
    # Without FSDP the transformers are not checkpointed: the flags alone sit between none and all.
    assert on.activations_all_checkpointing < on.activations < off.activations
