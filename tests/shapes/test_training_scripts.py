"""The shapes training scripts' shared pieces, and a tiny end-to-end run of the teacher script."""

import math

import pytest
import torch

from senseflow_algos.shapes.training import optimizer_step, warmup_cosine


def test_warmup_cosine_formula():
    assert [warmup_cosine(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 100, 4) == 1.0
    assert warmup_cosine(52, 100, 4) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 4) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(100, 100, 4, floor=0.1) == pytest.approx(0.1)
    p = (30 - 4) / 96
    assert warmup_cosine(30, 100, 4, floor=0.1) == 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def test_optimizer_step_clips_and_steps():
    w = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(w.parameters(), lr=1.0)
    before = w.weight.detach().clone()
    loss = (w(torch.full((1, 4), 100.0))).sum()
    optimizer_step(opt, loss, w, max_grad_norm=1.0)
    # Gradient 100 per entry, clipped to norm 1: every entry moves by exactly 0.5.
    assert torch.allclose(before - w.weight.detach(), torch.full((1, 4), 0.5))


def test_teacher_script_end_to_end(tmp_path):
    from senseflow_algos.shapes import components as C
    from senseflow_algos.shapes.train_teacher import main

    work, out = tmp_path / 'work', tmp_path / 'teacher'
    main(['--out', str(out), '--work', str(work), '--pool', '64', '--vae-steps', '2', '--vae-batch', '4',
          '--text-steps', '2', '--text-batch', '4', '--t2i-steps', '2', '--t2i-batch', '4', '--ft-steps', '2',
          '--ft-rounds', '2', '--guidance-steps', '2', '--guidance-batch', '4',
          '--heads', '2', '--head-dim', '16', '--double', '1', '--single', '1'])
    assert {'text.pt', 't2i.pt', 't2i_ft.pt', 't2i_ft2.pt', 'guidance.pt'} <= {p.name for p in work.iterdir()}
    pipe = C.load_teacher(out)
    card = (out / 'README.md').read_text()
    assert 'max_sequence_length=12' in card and 'height=32, width=32' in card
    # The t2i stage started from the text stage's encoders (then trained them further).
    text = torch.load(work / 'text.pt')['modules']
    t2i = torch.load(work / 't2i.pt')['modules']
    assert set(text) - {k for k in text if k.startswith('probe.')} <= set(t2i)
    # stage_check at CFG 1 is the plain conditional model: the library's Euler on the stage weights, decoded.
    from senseflow_algos.models.families.flux import FluxFamily
    from senseflow_algos.shapes.report import _noise
    from senseflow_algos.shapes.stage_check import stage_images

    prompts = ['a red circle above a blue square', 'a green square']
    got, _ = stage_images(work, 't2i.pt', prompts, guidance=1.0, steps=3, seed=1)
    tok, tok2 = C.build_tokenizers()
    clip, t5 = C.build_text_encoders(tok, tok2)
    net = C.build_transformer(0, heads=2, head_dim=16, double=1, single=1)
    torch.nn.ModuleDict({'transformer': net, 'text_encoder': clip, 'text_encoder_2': t5}).load_state_dict(t2i)
    fam = FluxFamily()
    with torch.no_grad():
        lat = C.sample_euler(net.eval(), C.encode_prompts(prompts, tok, clip.eval(), tok2, t5.eval()),
                             C.teacher_sigmas(3), _noise(2, (C.LATENT_CHANNELS, 8, 8), 1), guidance=1.0)
        expected = fam.decode_latents(pipe.vae, lat).clamp(-1, 1)
    assert torch.allclose(got, expected, atol=1e-5)
    saved = torch.load(work / 'guidance.pt')['modules']
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, saved[f'transformer.{k}']), k
    # --embedded on guidance.pt: one pass with the guidance in the embedding, as the exported pipeline is sampled.
    got, _ = stage_images(work, 'guidance.pt', prompts, guidance=4.0, steps=3, seed=1, embedded=True)
    with torch.no_grad():
        cond = C.encode_prompts(prompts, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)
        lat = C.sample_euler(pipe.transformer, cond, C.teacher_sigmas(3), _noise(2, (C.LATENT_CHANNELS, 8, 8), 1),
                             guidance=4.0)
        expected = fam.decode_latents(pipe.vae, lat).clamp(-1, 1)
    assert torch.allclose(got, expected, atol=1e-5)
    # The guidance stage changed the distilled transformer (it is not the fine-tuned one copied).
    ft = torch.load(work / 't2i_ft2.pt')['modules']
    assert any(not torch.equal(v, ft[k]) for k, v in saved.items() if k.startswith('transformer.'))
    _check_guidance_resume(work, tmp_path)


def _check_guidance_resume(work, tmp_path):
    """A guidance stage stopped right after its step-2 checkpoint and run again ends where an unbroken run ends."""
    import shutil

    from senseflow_algos.shapes import train_teacher as T

    arch = dict(heads=2, head_dim=16, double=1, single=1)
    runs = {}
    for name in ('unbroken', 'resumed'):
        runs[name] = tmp_path / name
        shutil.copytree(work, runs[name], ignore=shutil.ignore_patterns('guidance*.pt'))
    kwargs = dict(steps=4, batch=4, lr=3e-4, guidance_range=(1.0, 8.0), ema_decay=0.9, seed=0, arch=arch,
                  ft_rounds=2)
    every, original, T.CHECKPOINT_EVERY = T.CHECKPOINT_EVERY, T._checkpoint, 2
    try:
        T.stage_guidance(runs['unbroken'], **kwargs)

        def stop_after_first(ckpt, step, steps, *rest):
            original(ckpt, step, steps, *rest)
            if step == 1:
                raise KeyboardInterrupt

        T._checkpoint = stop_after_first
        with pytest.raises(KeyboardInterrupt):
            T.stage_guidance(runs['resumed'], **kwargs)
        T._checkpoint = original
        assert torch.load(runs['resumed'] / 'guidance_ckpt.pt')['step'] == 2
        assert not (runs['resumed'] / 'guidance.pt').exists()
        T.stage_guidance(runs['resumed'], **kwargs)
    finally:
        T.CHECKPOINT_EVERY, T._checkpoint = every, original
    a = torch.load(runs['unbroken'] / 'guidance.pt')['modules']
    b = torch.load(runs['resumed'] / 'guidance.pt')['modules']
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # Not vacuous: two more steps move the weights.
    ft = torch.load(work / 't2i_ft2.pt')['modules']
    assert any(not torch.equal(a[k], ft[k]) for k in a if k.startswith('transformer.'))


def test_teacher_ema_warmup_formula():
    """EMA with warm-up, by hand in float64: e_n = d_n e_(n-1) + (1 - d_n) w_n, d_n = min(decay, (1+n)/(10+n));
    an integer buffer is copied, not averaged."""
    from senseflow_algos.shapes.train_teacher import EMA

    net = torch.nn.Linear(3, 2)
    net.register_buffer('count', torch.tensor(0, dtype=torch.long))
    ema = EMA(net, decay=0.3)  # warm-up for n <= 2, capped at 0.3 from n = 3
    expected = net.weight.detach().double().clone()
    for n in range(1, 6):
        with torch.no_grad():
            net.weight.add_(torch.full_like(net.weight, float(n)))
        net.count.fill_(10 * n)
        ema.update(net)
        d = min(0.3, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * net.weight.detach().double()
        assert torch.allclose(ema.shadow['weight'].double(), expected, atol=1e-6, rtol=0)
        assert int(ema.shadow['count']) == 10 * n
    assert not torch.equal(ema.shadow['weight'], net.weight)  # averaged, not copied
    target = torch.nn.Linear(3, 2)
    target.register_buffer('count', torch.tensor(0, dtype=torch.long))
    assert torch.equal(ema.copy_to(target).weight, ema.shadow['weight'])
