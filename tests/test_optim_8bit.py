"""8-bit AdamW (``optimizer.kind: adamw_8bit``): phased like PhasedAdamW, uint8 moments, close to fp32 AdamW, exact
resume, refused with FSDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from optim_controller import Controller

from senseflow_algos.optim import Phase, PhasedAdamW

pytest.importorskip('bitsandbytes')
from senseflow_algos.optim_8bit import PhasedAdamW8bit  # noqa: E402

GEN, CRITIC = Phase('generator', ('generator',)), Phase('critic', ('fake_score',))


def _pair(cls, phases, **kw):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 128))
    b = torch.nn.Parameter(torch.randn(64, 128))
    opt = cls([{'params': [a], 'role': 'generator'}, {'params': [b], 'role': 'fake_score'}],
              controller=Controller(phases), lr=1e-2, **kw)
    return a, b, opt


def _run(a, b, opt, steps=10):
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        ga, gb = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)

        def closure(ga=ga, gb=gb):
            a.grad, b.grad = ga.clone(), gb.clone()
            return torch.tensor(0.0)

        opt.step(closure)


def test_moments_are_uint8_and_updates_track_fp32_adamw():
    a8, b8, opt8 = _pair(PhasedAdamW8bit, [GEN, CRITIC], min_8bit_size=256)
    a32, b32, opt32 = _pair(PhasedAdamW, [GEN, CRITIC])
    start = a8.detach().clone()
    _run(a8, b8, opt8)
    _run(a32, b32, opt32)
    state = opt8.state[a8]
    assert state['state1'].dtype == torch.uint8 and state['state2'].dtype == torch.uint8
    moment_bytes = sum(state[k].numel() * state[k].element_size() for k in ('state1', 'state2'))
    assert moment_bytes * 4 == sum(opt32.state[a32][k].numel() * 4 for k in ('exp_avg', 'exp_avg_sq'))
    moved = (a32 - start).abs().mean()
    # 10 steps of lr 1e-2 on random gradients move a weight by about 0.03 on average; 8-bit moments change
    # that by a few percent (measured 1-2%).
    assert moved > 0.02
    print('relative difference', ((a8 - a32).abs().mean() / moved).item(), ((b8 - b32).abs().mean() / moved).item())
    assert (a8 - a32).abs().mean() < 0.05 * moved
    assert (b8 - b32).abs().mean() < 0.05 * moved


def test_only_the_phase_roles_step():
    a, b, opt = _pair(PhasedAdamW8bit, [CRITIC], min_8bit_size=256)
    a0, b0 = a.detach().clone(), b.detach().clone()
    _run(a, b, opt, steps=2)
    assert torch.equal(a, a0) and not torch.equal(b, b0)
    assert int(opt.state[b]['step']) == 2 and not opt.state[a]


def test_small_tensors_keep_fp32_moments():
    a, b, opt = _pair(PhasedAdamW8bit, [GEN], min_8bit_size=64 * 128 + 1)
    _run(a, b, opt, steps=1)
    assert opt.state[a]['state1'].dtype == torch.float32


def test_training_resumes_exactly(make_trainer, tmp_path):
    over = ['model.gen_every=2', 'optimizer.kind=adamw_8bit', 'optimizer.min_8bit_size=256']
    trainer, rec_a = make_trainer('tiny_flux', [*over, 'trainer.max_duration=4ba', f'trainer.save_folder={tmp_path}',
                                                'trainer.save_interval=2ba'])
    opt = trainer.state.optimizers[0]
    assert isinstance(opt, PhasedAdamW8bit)
    trainer.fit()
    final = {k: v.detach().clone() for k, v in trainer.state.model.generator.state_dict().items()}
    assert any(s.get('state1') is not None and s['state1'].dtype == torch.uint8 for s in opt.state.values())
    trainer.close()
    trainer, rec_b = make_trainer('tiny_flux', [*over, 'trainer.max_duration=4ba',
                                                f'trainer.load_path={tmp_path / "ep0-ba2-rank0.pt"}'])
    trainer.fit()
    assert rec_b.losses == rec_a.losses[2:]
    for k, v in trainer.state.model.generator.state_dict().items():
        assert torch.equal(v, final[k]), k
    trainer.close()


def test_refused_with_fsdp():
    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / 'yamls' / 'sd35_medium.yaml', ['optimizer.kind=adamw_8bit'])
    with pytest.raises(ValueError, match='optimizer.kind=adamw_8bit is for unsharded runs'):
        build_trainer(cfg)
