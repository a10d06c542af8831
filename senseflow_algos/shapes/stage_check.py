"""Check a teacher training stage mid-way: sample a stage checkpoint with real classifier-free guidance and score it.

    python -m senseflow_algos.shapes.stage_check runs/shapes_teacher t2i_ckpt.pt [--guidance 4] [-n 128] [--steps 30]

Reads ``<work>/<file>`` (a ``t2i`` / ``t2i_ft`` stage output or its ``*_ckpt.pt``: the EMA weights when present), the
stage's VAE and ``args.json`` (the architecture), samples ``n`` prompts of the report suite (half one-shape, half
two-shape) with ``steps`` Euler steps of ``v_u + w (v_c - v_u)`` (the stage's model is not guidance-distilled yet) and
prints the evaluator's accuracies and the shape-by-geometry check. ``--embedded`` scores the ``guidance`` stage's
output instead (one pass, the guidance in its embedding, as the exported pipeline samples): the two side by side
show what guidance distillation costs. Runs with one thread beside the training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from senseflow_algos.sampling import run_sampler
from senseflow_algos.shapes import components as C


@torch.no_grad()
def stage_images(work: Path, file: str, prompts: list[str], guidance: float, steps: int, seed: int = 1,
                 embedded: bool = False):
    """Images ``(N, 3, 32, 32)`` in [-1, 1] of a stage checkpoint under real CFG ``guidance``.

    With ``embedded`` the checkpoint is the ``guidance`` stage's output: one pass with ``guidance`` in its guidance
    embedding instead of the two-pass combination.
    """
    from diffusers import AutoencoderKL

    from senseflow_algos.models.families.flux import FluxFamily
    from senseflow_algos.shapes.report import _noise

    args = json.loads((work / 'args.json').read_text())
    state = torch.load(work / file)
    tok, tok2 = C.build_tokenizers()
    clip, t5 = C.build_text_encoders(tok, tok2)
    net = C.build_transformer(0, args['heads'], args['head_dim'], args['double'], args['single'])
    modules = torch.nn.ModuleDict({'transformer': net, 'text_encoder': clip, 'text_encoder_2': t5}).eval()
    modules.load_state_dict(state['ema'] if 'ema' in state else state['modules'])
    vae = AutoencoderKL.from_pretrained(work / 'vae').eval()
    family, n = FluxFamily(), len(prompts)
    cond = C.encode_prompts(prompts, tok, clip, tok2, t5)
    empty = C.encode_prompts([''] * n, tok, clip, tok2, t5)
    both = {k: torch.cat([v, empty[k]]) for k, v in cond.items()}
    plain = torch.ones(2 * n)  # the stage's guidance input: 1, the plain conditional model

    def velocity(x, sigma):
        sigma = torch.as_tensor(sigma)
        if embedded:
            return family.velocity(net, x, sigma, cond, torch.full((n,), guidance))
        v_c, v_u = family.velocity(net, torch.cat([x, x]), torch.cat([sigma, sigma]) if sigma.dim() else sigma,
                                   both, plain).chunk(2)
        return v_u + guidance * (v_c - v_u)

    noise = _noise(n, family.latent_shape(vae, C.RESOLUTION), seed)
    latents = run_sampler(velocity, noise, C.teacher_sigmas(steps), method='euler')
    return family.decode_latents(vae, latents).clamp(-1, 1), state.get('step')


def main(argv=None) -> None:
    from senseflow_algos.shapes.evaluator import ShapesEvaluator
    from senseflow_algos.shapes.report import evaluate_images, prompt_suite

    p = argparse.ArgumentParser(prog='python -m senseflow_algos.shapes.stage_check', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('work', help='the teacher script\'s --work folder')
    p.add_argument('file', help='stage file in it, e.g. t2i_ckpt.pt or t2i.pt')
    p.add_argument('--guidance', type=float, default=C.DEFAULT_GUIDANCE)
    p.add_argument('-n', type=int, default=128)
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--embedded', action='store_true',
                   help='the file is guidance-distilled (guidance.pt): guidance goes into its embedding')
    a = p.parse_args(argv)
    C.num_threads(a.threads)
    t = time.time()
    prompts = prompt_suite(a.n)
    images, step = stage_images(Path(a.work), a.file, prompts, a.guidance, a.steps, embedded=a.embedded)
    row = evaluate_images(ShapesEvaluator(), images, prompts)
    acc, geo = row['acc'], row['geometry']
    print(f'{a.file} (step {step}), {"embedded" if a.embedded else "CFG"} {a.guidance:g}, {a.steps} steps, {a.n} prompts: '
          f'single {acc["single"]["prompt"]:.3f}, two {acc["two"]["prompt"]:.3f}, position '
          f'{acc["single"]["position"]:.3f}, relation {acc["two"]["relation"]:.3f}, object (two) '
          f'{acc["two"]["object"]:.3f}, count (two) {acc["two"]["count"]:.3f}, shape by geometry '
          f'{geo["single"]:.3f} / {geo["two"]:.3f} ({time.time() - t:.0f}s)')


if __name__ == '__main__':
    main()
