"""The ``data_prep/`` converters: each one round-trips into a training batch; images are stored as read; parts resume;
``--help`` explains every flag."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.conftest import NUM_IMAGES, RESOLUTION, load_script, read_dataset


def _all_samples(root):
    from streaming import LocalDataset

    data = LocalDataset(str(root))
    return [data[i] for i in range(len(data))]


def test_folder_round_trip_is_lossless(image_folder, image_mds):
    from senseflow_algos.data.streaming import image_to_tensor

    samples = _all_samples(image_mds)
    assert len(samples) == NUM_IMAGES
    assert sorted(os.listdir(image_mds)) == ['index.json', 'part-00000', 'part-00001', 'part-00002',
                                             'senseflow_prep.json']
    by_key = {s['key']: s for s in samples}
    for path in sorted(image_folder.glob('*.*')):
        if path.suffix == '.txt':
            continue
        sample = by_key[path.name]
        assert sample['image'] == path.read_bytes()  # the file's bytes, as read
        assert sample['caption'] == path.with_suffix('.txt').read_text().strip()
        with Image.open(path) as im:
            assert (sample['width'], sample['height']) == im.size
    # A training batch: decoded, resized and centre-cropped to [-1, 1], in the dataset's order.
    loader = read_dataset(image_mds, 'image_caption', batch_size=4)
    batch = next(iter(loader))
    assert set(batch) == {'image', 'prompt'}
    assert batch['image'].shape == (4, 3, RESOLUTION, RESOLUTION)
    for n in range(4):
        sample = samples[n]
        assert batch['prompt'][n] == sample['caption']
        with Image.open(image_folder / sample['key']) as im:
            assert torch.equal(batch['image'][n], image_to_tensor(im, RESOLUTION))
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1


def test_resume_rewrites_only_unfinished_parts(image_folder, tmp_path, run_script, capsys):
    out = tmp_path / 'mds'
    assert run_script('images_to_mds', '--images', image_folder, '--out', out, '--part-size', 5) == 0
    first = _all_samples(out)
    # An interrupted run: part 1 has no index.json (never finished), the merged index is missing too.
    (out / 'part-00001' / 'index.json').unlink()
    (out / 'index.json').unlink()
    mtime0 = (out / 'part-00000' / 'index.json').stat().st_mtime_ns
    capsys.readouterr()
    assert run_script('images_to_mds', '--images', image_folder, '--out', out, '--part-size', 5) == 0
    assert '1 parts written, 2 already done' in capsys.readouterr().out
    assert (out / 'part-00000' / 'index.json').stat().st_mtime_ns == mtime0
    assert _all_samples(out) == first
    # Other settings into the same output are refused (unless --overwrite).
    with pytest.raises(FileExistsError, match='part_size'):
        run_script('images_to_mds', '--images', image_folder, '--out', out, '--part-size', 4)
    assert run_script('images_to_mds', '--images', image_folder, '--out', out, '--part-size', 4, '--overwrite') == 0
    assert _all_samples(out) == first


def _manifest_rows(image_folder):
    rows = []
    for path in sorted(image_folder.glob('*.png'))[:5]:
        rows.append({'path': path.name, 'text': path.with_suffix('.txt').read_text()})
    return rows


@pytest.mark.parametrize('fmt', ['jsonl', 'csv', 'parquet'])
def test_manifest_round_trip(fmt, image_folder, tmp_path, run_script, capsys):
    rows = _manifest_rows(image_folder)
    manifest = tmp_path / f'manifest.{fmt}'
    if fmt == 'jsonl':
        manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    elif fmt == 'csv':
        with manifest.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=['path', 'text'])
            writer.writeheader()
            writer.writerows(rows)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            # Not installed here: the converter must say so clearly (and how to proceed).
            manifest.write_bytes(b'PAR1')
            rc = run_script('manifest_to_mds', '--manifest', manifest, '--image-root', image_folder,
                            '--image-column', 'path', '--caption-column', 'text', '--out', tmp_path / 'mds')
            assert rc == 2
            err = capsys.readouterr().err
            assert 'pyarrow' in err and 'JSONL' in err
            return
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / 'mds'
    assert run_script('manifest_to_mds', '--manifest', manifest, '--image-root', image_folder, '--image-column',
                      'path', '--caption-column', 'text', '--out', out) == 0
    samples = _all_samples(out)
    assert [s['caption'] for s in samples] == [r['text'] for r in rows]
    assert [s['image'] for s in samples] == [(image_folder / r['path']).read_bytes() for r in rows]
    assert [s['key'] for s in samples] == [f'manifest.{fmt}:{n}' for n in range(len(rows))]
    batch = next(iter(read_dataset(out, 'image_caption', batch_size=5)))
    assert batch['prompt'] == [r['text'] for r in rows]


def test_manifest_missing_column_is_named(image_folder, tmp_path, run_script, capsys):
    manifest = tmp_path / 'm.jsonl'
    manifest.write_text(json.dumps({'image': '000000.png'}) + '\n')
    assert run_script('manifest_to_mds', '--manifest', manifest, '--out', tmp_path / 'o') == 2
    err = capsys.readouterr().err
    assert "row 0: no column ['caption']" in err


def test_prompts_text_file_and_manifest_column(tmp_path, run_script):
    prompts = ['a red circle', 'a blue square above a green star', 'a white line']
    txt = tmp_path / 'prompts.txt'
    txt.write_text('\n'.join(prompts) + '\n')
    assert run_script('prompts_to_mds', '--prompts', txt, '--out', tmp_path / 'p1') == 0
    manifest = tmp_path / 'p.jsonl'
    manifest.write_text(''.join(json.dumps({'prompt': p, 'other': 1}) + '\n' for p in prompts))
    assert run_script('prompts_to_mds', '--prompts', manifest, '--column', 'prompt', '--out', tmp_path / 'p2') == 0
    for out in ('p1', 'p2'):
        samples = _all_samples(tmp_path / out)
        assert [s['caption'] for s in samples] == prompts
        assert set(samples[0]) == {'caption', 'key'}
        batch = next(iter(read_dataset(tmp_path / out, 'prompts', batch_size=3)))
        assert batch == {'prompt': prompts}


@pytest.mark.parametrize('script', ['images_to_mds', 'manifest_to_mds', 'prompts_to_mds', 'precompute',
                                    'example_images'])
def test_help_explains_every_flag(script, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(['--help'])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser_flags = [a for a in module.build_parser()._actions if a.option_strings and a.dest != 'help']
    assert parser_flags
    for action in parser_flags:
        assert action.help and len(action.help) > 10, f'{script}: {action.option_strings} has no help'
        assert action.option_strings[-1] in text


def test_example_images_are_deterministic(tmp_path, run_script):
    assert run_script('example_images', '--out', tmp_path / 'a', '--num', 3, '--size', 16) == 0
    assert run_script('example_images', '--out', tmp_path / 'b', '--num', 3, '--size', 16) == 0
    for name in ('000000.png', '000002.txt'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    assert np.asarray(Image.open(tmp_path / 'a' / '000001.png')).shape == (16, 16, 3)
