"""``data_prep/precompute.py``: the stored embeddings and latents equal online encoding with the tiny FLUX and SD 3.5
components (to float16 precision), a rerun skips finished parts, prompt-only data gets embeddings only, and
``composer -n 2`` splits the parts over two ranks into the same dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.data.conftest import NUM_IMAGES, RESOLUTION, TINY_SEED, read_dataset


def _fp16_close(stored: torch.Tensor, online: torch.Tensor) -> None:
    """Equal to float16 precision (half an ulp is 2**-11 relative; batch composition moves float32 results by a few
    float32 ulps, which can flip a float16 rounding)."""
    torch.testing.assert_close(stored.float(), online.detach().float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('family', ['flux', 'sd35'])
def test_precomputed_equals_online_encoding(family, precomputed):
    from senseflow_algos.models.factory import build_dmd_model

    root = precomputed(family)
    meta = json.loads((root / 'senseflow_precompute.json').read_text())
    assert meta['family'] == family and meta['resolution'] == RESOLUTION and meta['latents'] is True
    assert meta['command'].startswith('data_prep/precompute.py --input')
    loader = read_dataset(root, 'precomputed', batch_size=NUM_IMAGES)
    batch = next(iter(loader))
    # The encoders exactly as a training run of the tiny config (seed 17) builds them.
    model = build_dmd_model(family=family, tiny=True, resolution=RESOLUTION, seed=TINY_SEED)
    online = model.conditioner(batch['prompt'])
    expected_keys = {'prompt_embeds', 'pooled_prompt_embeds'}
    if family == 'sd35':
        expected_keys |= {'negative_prompt_embeds', 'negative_pooled_prompt_embeds'}
        assert (root / 'negative_embeddings.npz').is_file()
    assert set(online) == expected_keys
    for key in expected_keys:
        assert batch[key].dtype == torch.float32
        if key.startswith('negative_'):  # stored once, in float32
            torch.testing.assert_close(batch[key], online[key].float(), rtol=0, atol=1e-6)
        else:
            _fp16_close(batch[key], online[key])
    # Latents: the VAE on the same decoded, resized, centre-cropped image the image_caption path yields.
    with torch.no_grad():
        latents = model.family.encode_images(model.vae, batch['image'])
    assert batch['latents'].shape == (NUM_IMAGES, *model.latent_shape)
    _fp16_close(batch['latents'], latents)
    # The precomputed batch is what the model uses in place of its encoders.
    assert model.conditioning(batch).keys() == expected_keys
    torch.testing.assert_close(model.real_latents(batch), batch['latents'])


def test_rerun_skips_finished_parts(precomputed, image_mds, run_script, tmp_path, capsys):
    src = precomputed('flux')
    out = tmp_path / 'copy'
    shutil.copytree(src, out)
    meta_before = json.loads((out / 'senseflow_precompute.json').read_text())
    args = ['--input', image_mds, '--out', out, '--family', 'flux', '--tiny', '--seed', TINY_SEED, '--resolution',
            RESOLUTION, '--part-size', 5, '--batch-size', 4]
    # Part 2 never finished.
    (out / 'part-00002' / 'index.json').unlink()
    shard_mtime = (out / 'part-00000' / 'shard.00000.mds').stat().st_mtime_ns
    capsys.readouterr()
    assert run_script('precompute', *args) == 0
    assert '1 parts written, 2 already done' in capsys.readouterr().out
    assert (out / 'part-00000' / 'shard.00000.mds').stat().st_mtime_ns == shard_mtime
    for part in ('part-00000', 'part-00001', 'part-00002'):
        assert (out / part / 'shard.00000.mds').read_bytes() == (src / part / 'shard.00000.mds').read_bytes()
    assert json.loads((out / 'index.json').read_text()) == json.loads((src / 'index.json').read_text())
    meta_after = json.loads((out / 'senseflow_precompute.json').read_text())
    assert meta_after.pop('command').endswith(f'--out {out} --family flux --tiny --seed 17 --resolution 32 '
                                              '--part-size 5 --batch-size 4 --no-progress')
    meta_before.pop('command')
    assert meta_after == meta_before
    # Another teacher into the same output is refused.
    with pytest.raises(FileExistsError, match='family'):
        run_script('precompute', *[a if a != 'flux' else 'sd35' for a in args])


def test_prompt_only_data_gets_embeddings_only(tmp_path, run_script):
    txt = tmp_path / 'prompts.txt'
    txt.write_text('a red circle\na blue star\na green line\n')
    assert run_script('prompts_to_mds', '--prompts', txt, '--out', tmp_path / 'p') == 0
    assert run_script('precompute', '--input', tmp_path / 'p', '--out', tmp_path / 'pe', '--family', 'flux',
                      '--tiny', '--resolution', RESOLUTION) == 0
    meta = json.loads((tmp_path / 'pe' / 'senseflow_precompute.json').read_text())
    assert meta['latents'] is False and 'latents' not in meta['columns']
    batch = next(iter(read_dataset(tmp_path / 'pe', 'precomputed', batch_size=3)))
    assert set(batch) == {'prompt', 'prompt_embeds', 'pooled_prompt_embeds'}
    assert batch['prompt'] == ['a red circle', 'a blue star', 'a green line']


def test_composer_two_ranks_make_the_same_dataset(precomputed, image_mds, tmp_path):
    launcher = shutil.which('composer')
    assert launcher, 'the composer launcher is not on PATH'
    out = tmp_path / 'ranks'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [launcher, '-n', '2', '--stdout', str(tmp_path / 'rank{rank}.out'), '--stderr',
         str(tmp_path / 'rank{rank}.err'), 'data_prep/precompute.py', '--input', str(image_mds), '--out', str(out),
         '--family', 'flux', '--tiny', '--seed', str(TINY_SEED), '--resolution', str(RESOLUTION), '--part-size', '5',
         '--batch-size', '4', '--device', 'cpu', '--no-progress'],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), capture_output=True, text=True, timeout=300,
        env=env)
    logs = ''.join(p.read_text()[-2000:] for p in sorted(tmp_path.glob('rank*.*')))  # rank 1's output
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    # Rank 0 wrote parts 0 and 2, rank 1 part 1; rank 0 merged the index (rank 0's output is piped through).
    assert 'rank 0: 2 parts written' in proc.stdout
    single = precomputed('flux')
    from streaming import LocalDataset

    a, b = LocalDataset(str(single)), LocalDataset(str(out))
    assert len(a) == len(b) == NUM_IMAGES
    for i in range(NUM_IMAGES):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]) if isinstance(x[k], np.ndarray) else x[k] == y[k], k


if __name__ == '__main__':  # pragma: no cover
    sys.exit(pytest.main([__file__, '-q']))
