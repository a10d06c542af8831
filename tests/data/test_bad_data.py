"""Bad data never becomes a silent wrong batch: a missing column, a wrong embedding shape for the family, an
unreadable image and an empty caption each give a clear error naming the shard and sample, or (configured) a counted
skip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.data.conftest import RESOLUTION, load_script, read_dataset


def _write_mds(root, columns, samples):
    from streaming import MDSWriter

    with MDSWriter(out=str(root), columns=columns) as writer:
        for sample in samples:
            writer.write(sample)


def _png_bytes(colour=(255, 0, 0), size=(40, 40)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new('RGB', size, colour).save(buf, format='PNG')
    return buf.getvalue()


IMAGE_COLUMNS = {'image': 'bytes', 'caption': 'str', 'key': 'str'}


@pytest.fixture
def bad_image_mds(tmp_path):
    """Six samples; sample 2 has a truncated PNG, sample 4 an empty caption."""
    good = _png_bytes()
    samples = []
    for i in range(6):
        image = good[:40] if i == 2 else good
        caption = '  ' if i == 4 else f'a red square {i}'
        samples.append({'image': image, 'caption': caption, 'key': f'img{i}.png'})
    _write_mds(tmp_path / 'bad', IMAGE_COLUMNS, samples)
    return tmp_path / 'bad'


def test_one_bad_data_exception():
    """One class for bad data at every stage (issue 17 item 2): data_prep's per-record checks, the training data's
    per-sample checks and its shard / stream errors."""
    from senseflow_algos.data import BadSampleError, samples, streaming

    assert streaming.BadSampleError is samples.BadSampleError is BadSampleError
    assert load_script('precompute').BadSampleError is BadSampleError
    import mds_writer  # data_prep/, put on sys.path by load_script as when the scripts run

    assert mds_writer.BadSampleError is BadSampleError
    with pytest.raises(BadSampleError, match='unreadable image'):
        samples.open_image(b'not an image')


# -- converters -------------------------------------------------------------------------------------------------------


def test_converter_bad_records_error_or_counted_skip(tmp_path, image_folder, run_script, capsys, caplog):
    folder = tmp_path / 'imgs'
    shutil.copytree(image_folder, folder)
    (folder / '000001.png').write_bytes(b'not a png')  # unreadable
    (folder / '000003.txt').write_text('   \n')  # empty caption
    (folder / '000005.txt').unlink()  # no caption file
    with pytest.raises(ValueError, match=r"key '000001.png'.*unreadable image"):
        run_script('images_to_mds', '--images', folder, '--out', tmp_path / 'o1')
    capsys.readouterr()
    assert run_script('images_to_mds', '--images', folder, '--out', tmp_path / 'o2', '--on-bad', 'skip') == 0
    assert '3 bad records skipped' in capsys.readouterr().out
    logged = caplog.text
    assert "key '000001.png'" in logged and 'unreadable image' in logged
    assert "key '000003.png'" in logged and 'empty caption' in logged
    assert "key '000005.png'" in logged and 'no caption' in logged
    from streaming import LocalDataset

    keys = [s['key'] for s in LocalDataset(str(tmp_path / 'o2'))]
    assert '000001.png' not in keys and '000003.png' not in keys and '000005.png' not in keys
    assert len(keys) == len(list(image_folder.glob('*.txt'))) - 3


def test_prompt_converter_empty_prompt(tmp_path, run_script):
    txt = tmp_path / 'p.txt'
    txt.write_text('a red circle\n\na blue star\n')
    with pytest.raises(ValueError, match=r"key 'p.txt:2'.*empty caption"):
        run_script('prompts_to_mds', '--prompts', txt, '--out', tmp_path / 'o')


# -- datasets ---------------------------------------------------------------------------------------------------------


def test_missing_column_names_the_shard(image_mds, tmp_path, run_script):
    from senseflow_algos.data.streaming import BadSampleError

    txt = tmp_path / 'p.txt'
    txt.write_text('a red circle\n')
    assert run_script('prompts_to_mds', '--prompts', txt, '--out', tmp_path / 'p') == 0
    with pytest.raises(BadSampleError, match=r"shard part-00000/shard.00000.mds has no column \['image'\]"):
        read_dataset(tmp_path / 'p', 'image_caption')
    # Not yet precomputed.
    with pytest.raises(BadSampleError, match=r"no senseflow_precompute.json"):
        read_dataset(image_mds, 'precomputed')


def test_missing_embedding_column_names_the_shard(precomputed, tmp_path):
    from senseflow_algos.data.streaming import BadSampleError

    root = tmp_path / 'noemb'
    _write_mds(root, {'caption': 'str', 'prompt_embeds': 'ndarray:float16:512,32'},
               [{'caption': 'a', 'prompt_embeds': np.zeros((512, 32), np.float16)}])
    shutil.copy(precomputed('flux') / 'senseflow_precompute.json', root)
    with pytest.raises(BadSampleError, match=r"shard shard.00000.mds has no column \['pooled_prompt_embeds'\]"):
        read_dataset(root, 'precomputed')


def test_streams_of_different_families_are_refused(precomputed):
    from senseflow_algos.data.streaming import BadSampleError, build_streaming_dataloader

    with pytest.raises(BadSampleError, match='precomputed differently'):
        build_streaming_dataloader('precomputed', batch_size=2, resolution=RESOLUTION, shuffle=False,
                                   streams=[{'remote': str(precomputed('flux'))}, {'remote': str(precomputed('sd35'))}],
                                   streaming_kwargs={'num_canonical_nodes': 1})


def test_wrong_embedding_shape_for_the_family(precomputed, tmp_path):
    from senseflow_algos.data.streaming import BadSampleError

    # A shard whose typed column disagrees with the dataset's family metadata (e.g. shards of two teachers mixed).
    root = tmp_path / 'mixed'
    shutil.copytree(precomputed('flux'), root)
    meta = json.loads((root / 'senseflow_precompute.json').read_text())
    meta['columns']['pooled_prompt_embeds'] = 'ndarray:float16:40'  # what SD 3.5 tiny stores
    (root / 'senseflow_precompute.json').write_text(json.dumps(meta))
    with pytest.raises(BadSampleError, match=r"shard part-00000/shard.00000.mds: column 'pooled_prompt_embeds' "
                       r"is 'ndarray:float16:24'.*wrong embedding shape for the family"):
        read_dataset(root, 'precomputed')


def test_untyped_embedding_shape_checked_per_sample(tmp_path, precomputed):
    from senseflow_algos.data.streaming import BadSampleError

    root = tmp_path / 'untyped'
    ok = {'caption': 'a red square', 'prompt_embeds': np.zeros((512, 32), np.float16),
          'pooled_prompt_embeds': np.zeros(24, np.float16), 'latents': np.zeros((4, 16, 16), np.float16)}
    bad = dict(ok, pooled_prompt_embeds=np.zeros(40, np.float16))
    nan = dict(ok, latents=np.full((4, 16, 16), np.nan, np.float16))
    _write_mds(root, {'caption': 'str', 'prompt_embeds': 'ndarray', 'pooled_prompt_embeds': 'ndarray',
                      'latents': 'ndarray'}, [ok, bad, ok, nan])
    shutil.copy(precomputed('flux') / 'senseflow_precompute.json', root)
    data = read_dataset(root, 'precomputed', batch_size=1).dataset
    data[0]
    with pytest.raises(BadSampleError, match=r'sample 1 of the shard.*pooled_prompt_embeds has shape \(40,\), '
                       r"expected \(24,\) for family 'flux'"):
        data[1]
    with pytest.raises(BadSampleError, match=r'sample 3 of the shard.*latents has non-finite values'):
        data[3]


def test_model_refuses_embeddings_of_another_family(precomputed):
    from senseflow_algos.models.factory import build_dmd_model

    batch = next(iter(read_dataset(precomputed('sd35'), 'precomputed', batch_size=2)))
    model = build_dmd_model(family='flux', tiny=True, resolution=RESOLUTION, seed=17, text_encoders=False)
    with pytest.raises(ValueError, match=r'precomputed prompt_embeds has shape \(2, 589, 48\) but the flux teacher '
                       r'takes \(batch, tokens, 32\)'):
        model.conditioning(batch)
    other = build_dmd_model(family='flux', tiny=True, resolution=2 * RESOLUTION, seed=17, text_encoders=False)
    flux_batch = next(iter(read_dataset(precomputed('flux'), 'precomputed', batch_size=2)))
    with pytest.raises(ValueError, match='precomputed latents have shape'):
        other.real_latents(flux_batch)


def test_latents_of_another_resolution_refused_at_build(precomputed):
    from senseflow_algos.data.streaming import BadSampleError, build_streaming_dataloader

    with pytest.raises(BadSampleError, match='latents were precomputed at resolution 32 but the model trains at 64'):
        build_streaming_dataloader('precomputed', batch_size=2, resolution=64, remote=str(precomputed('flux')),
                                   shuffle=False, streaming_kwargs={'num_canonical_nodes': 1})


def test_unreadable_image_and_empty_caption_raise_naming_shard_and_sample(bad_image_mds):
    from senseflow_algos.data.streaming import BadSampleError

    data = read_dataset(bad_image_mds, 'image_caption', batch_size=1).dataset
    assert data[0]['prompt'] == 'a red square 0'
    with pytest.raises(BadSampleError, match=r"shard shard.00000.mds, sample 2 of the shard \(dataset index 2\), "
                       r"key 'img2.png': unreadable image"):
        data[2]
    with pytest.raises(BadSampleError, match=r"sample 4 of the shard.*key 'img4.png': empty caption"):
        data[4]
    loader = read_dataset(bad_image_mds, 'image_caption', batch_size=2)
    with pytest.raises(BadSampleError, match='unreadable image'):
        list(loader)


def test_bad_samples_skip_replaces_and_counts(bad_image_mds, caplog):
    loader = read_dataset(bad_image_mds, 'image_caption', batch_size=2, bad_samples='skip')
    prompts = [p for batch in loader for p in batch['prompt']]
    # Each bad sample is replaced by the next good one (deterministic, so resumption stays exact).
    assert prompts == ['a red square 0', 'a red square 1', 'a red square 3', 'a red square 3', 'a red square 5',
                       'a red square 5']
    assert loader.dataset.num_bad_samples == 2
    assert "key 'img2.png': unreadable image" in caplog.text and "key 'img4.png': empty caption" in caplog.text
    batch = next(iter(read_dataset(bad_image_mds, 'image_caption', batch_size=6, bad_samples='skip')))
    assert batch['image'].shape == (6, 3, RESOLUTION, RESOLUTION) and torch.isfinite(batch['image']).all()


def test_precompute_bad_records(tmp_path, bad_image_mds, run_script, capsys):
    args = ['--input', bad_image_mds, '--family', 'flux', '--tiny', '--resolution', RESOLUTION]
    with pytest.raises(ValueError, match=r"input shard shard.00000.mds, sample 2, key 'img2.png': unreadable image"):
        run_script('precompute', *args, '--out', tmp_path / 'e')
    capsys.readouterr()
    assert run_script('precompute', *args, '--out', tmp_path / 's', '--on-bad', 'skip') == 0
    assert '2 bad records skipped' in capsys.readouterr().out
    prompts = [p for b in read_dataset(tmp_path / 's', 'precomputed', batch_size=1) for p in b['prompt']]
    assert prompts == ['a red square 0', 'a red square 1', 'a red square 3', 'a red square 5']
