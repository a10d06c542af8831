"""``model.compile_blocks``: every transformer block of generator, fake score and teacher compiled in place.

The fast tests check that the option reaches the blocks (and nothing else), that the blocks keep their class and
state-dict keys (FSDP's per-block wrap and checkpoints see the same modules), and that bad values and incompatible
settings are refused naming the key. The numerics check (compiled vs eager losses) takes minutes of inductor
compilation on a CPU with a cold inductor cache (200-373 s on this project's 2-core machine,
bench/results/compile_check.md; 36 s warm), so it is ``slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from senseflow_algos.models.blocks import TRANSFORMER_NETWORKS
from senseflow_algos.models.factory import build_dmd_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))


def _blocks(net):
    return [b for attr in ('transformer_blocks', 'single_transformer_blocks') for b in getattr(net, attr, [])]


@pytest.fixture(scope='module')
def models():
    return {on: build_dmd_model('flux', resolution=32, tiny=True, compile_blocks=on) for on in (False, True)}


def test_option_reaches_every_block_and_only_blocks(models):
    for name in TRANSFORMER_NETWORKS:
        eager, compiled = getattr(models[False], name), getattr(models[True], name)
        assert _blocks(compiled) and all(b._compiled_call_impl is not None for b in _blocks(compiled)), name
        assert all(b._compiled_call_impl is None for b in _blocks(eager)), name
        assert compiled._compiled_call_impl is None  # the network itself (and its embedders) stays eager
        assert [type(b) for b in _blocks(compiled)] == [type(b) for b in _blocks(eager)]
        assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    assert models[True].vae._compiled_call_impl is None


def test_fsdp_wrap_hooks_still_match_compiled_blocks(models):
    import torch

    from senseflow_algos.models.fsdp import prepare_for_fsdp

    model = prepare_for_fsdp(models[True], torch.device('cpu'))
    for name in TRANSFORMER_NETWORKS:
        net = getattr(model, name)
        assert all(net.fsdp_wrap_fn(b) for b in _blocks(net)), name
        if name != 'teacher':
            assert all(net.activation_checkpointing_fn(b) for b in _blocks(net)), name


def test_bad_value_names_the_key():
    from senseflow_algos.config import ConfigError, load_config, validate_config

    with pytest.raises(ValueError, match='model.compile_blocks'):
        build_dmd_model('flux', resolution=32, tiny=True, compile_blocks='yes')
    path = Path(__file__).resolve().parents[1] / 'yamls' / 'tiny_flux.yaml'
    with pytest.raises(ConfigError, match='model.compile_blocks'):
        validate_config(load_config(path, ['model.compile_blocks=3']), source=str(path))
    with pytest.raises(ConfigError, match='trainer.compile_config'):  # Composer's whole-model compile is not offered
        validate_config(load_config(path, ['trainer.compile_config={}']), source=str(path))


def test_refused_with_fsdp1_flat_parameters():
    from senseflow_algos.builders import check_compile_blocks

    cfg = {'model': {'compile_blocks': True},
           'trainer': {'parallelism_config': {'fsdp': {'use_orig_params': False}}}}
    with pytest.raises(ValueError, match='model.compile_blocks.*use_orig_params'):
        check_compile_blocks(cfg, fsdp_version='1')
    check_compile_blocks(cfg, fsdp_version='2')  # FSDP2 has no flat parameters
    check_compile_blocks({**cfg, 'model': {'compile_blocks': False}}, fsdp_version='1')


@pytest.mark.slow
def test_compiled_losses_match_eager():
    """Tiny FLUX with all algorithms, 3 batches (a generator phase and two critic-only batches) both ways."""
    from compile_check import ATOL, RTOL, run

    eager, compiled = run(3, compile_blocks=False), run(3, compile_blocks=True)
    assert len(eager['losses']) == len(compiled['losses']) == 3
    for a, b in zip(eager['losses'], compiled['losses']):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL), k
