"""Bad checkpoints are named, and a run survives one: a truncated or garbage ``trainer.load_path`` or export source
gives a :class:`CheckpointError` naming the file and what is wrong; ``trainer.autoresume`` skips an unreadable newest
checkpoint for the newest readable one, says which it skipped, and continues exactly as the run would have."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from senseflow_algos.builders import build_trainer
from senseflow_algos.checkpointing import UNREADABLE_SUFFIX, CheckpointError, check_checkpoint
from senseflow_algos.config import load_config
from senseflow_algos.export import main as export_main

REPO = Path(__file__).resolve().parents[1]
BASE = ['trainer.progress_bar=false', 'trainer.save_interval=1ba', 'trainer.autoresume=true', 'model.gen_every=2',
        'algorithms.vfm_discriminator=null', 'run_name=bad-ckpt']


def _cfg(folder: Path, *overrides: str) -> dict:
    return load_config(REPO / 'yamls' / 'tiny_flux.yaml', [*BASE, f'trainer.save_folder={folder}', *overrides])


def _fit(cfg: dict):
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    return trainer


def _model(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


def _truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Two batches of tiny FLUX with a checkpoint after each."""
    folder = tmp_path_factory.mktemp('bad') / 'run'
    _fit(_cfg(folder, 'trainer.max_duration=2ba'))
    return folder


def test_bad_files_are_named_with_what_is_wrong(run, tmp_path):
    good = run / 'ep0-ba1-rank0.pt'
    assert check_checkpoint(good) == 'pt'
    truncated = _truncate(good, tmp_path / 'truncated.pt')
    with pytest.raises(CheckpointError, match=rf'{truncated}.*truncated'):
        check_checkpoint(truncated)
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'this is not a checkpoint\n' * 100)
    with pytest.raises(CheckpointError, match=rf'{garbage} is not a checkpoint'):
        check_checkpoint(garbage)
    empty = tmp_path / 'empty.pt'
    empty.touch()
    with pytest.raises(CheckpointError, match='empty'):
        check_checkpoint(empty)
    other = tmp_path / 'other.pt'
    torch.save({'weights': torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=r'not a Composer checkpoint.*weights'):
        check_checkpoint(other)
    with zipfile.ZipFile(tmp_path / 'plain.pt', 'w') as z:
        z.writestr('readme.txt', 'hello')
    with pytest.raises(CheckpointError, match='not a torch.save file'):
        check_checkpoint(tmp_path / 'plain.pt')


def test_bad_sharded_folders_are_named(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / 'ep0-ba1'
    dcp.save({'state': {'model': {'generator.w': torch.arange(4096.0)}}}, checkpoint_id=str(folder), no_dist=True)
    assert check_checkpoint(folder) == 'sharded'
    shard = next(folder.glob('*.distcp'))
    _truncate(shard, shard, keep=0.3)
    with pytest.raises(CheckpointError, match=rf'shard {shard} is truncated'):
        check_checkpoint(folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf'shard {shard} .* is missing'):
        check_checkpoint(folder)
    (folder / '.metadata').unlink()
    (folder / '__0_0.distcp').write_bytes(b'x')
    with pytest.raises(CheckpointError, match=rf'{folder} has no .metadata'):
        check_checkpoint(folder)


def test_load_path_to_a_bad_file_fails_naming_it(run, tmp_path):
    truncated = _truncate(run / 'ep0-ba1-rank0.pt', tmp_path / 'ep0-ba1-rank0.pt')
    cfg = _cfg(tmp_path / 'fresh', 'trainer.autoresume=false', f'trainer.load_path={truncated}')
    with pytest.raises(CheckpointError, match=rf'trainer.load_path: checkpoint {truncated} is truncated'):
        build_trainer(cfg)


def test_export_of_a_bad_file_exits_2_naming_it(run, tmp_path, capsys):
    truncated = _truncate(run / 'ep0-ba1-rank0.pt', tmp_path / 'ep0-ba1-rank0.pt')
    assert export_main([str(truncated), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and 'truncated' in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_autoresume_skips_an_unreadable_newest_checkpoint(run, tmp_path, capsys):
    folder = tmp_path / 'run'
    shutil.copytree(run, folder, symlinks=True)
    newest = folder / 'ep0-ba2-rank0.pt'
    original = _model(newest)
    _truncate(newest, newest)  # a disk fault or a copy cut short
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba2-rank0.pt'
    capsys.readouterr()
    _fit(_cfg(folder, 'trainer.max_duration=3ba'))
    out = capsys.readouterr().out
    assert f'skipping unreadable checkpoint {newest}' in out and 'truncated' in out
    assert f'resuming from {folder / "ep0-ba1-rank0.pt"}' in out
    assert (folder / ('ep0-ba2-rank0.pt' + UNREADABLE_SUFFIX)).is_file()  # kept for inspection
    # The run continued from batch 1: batch 2 again, then 3; the redone batch 2 equals the original one exactly.
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba3-rank0.pt'
    redone = _model(folder / 'ep0-ba2-rank0.pt')
    assert original.keys() == redone.keys()
    assert all(torch.equal(original[k], redone[k]) for k in original)
    assert int(_model(folder / 'ep0-ba3-rank0.pt')['batches_seen']) == 3


def test_autoresume_with_nothing_readable_fails_naming_them(run, tmp_path):
    folder = tmp_path / 'run'
    shutil.copytree(run, folder, symlinks=True)
    for name in ('ep0-ba1-rank0.pt', 'ep0-ba2-rank0.pt'):
        (folder / name).write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match=r'no readable checkpoint.*ep0-ba2-rank0.pt.*ep0-ba1-rank0.pt'):
        build_trainer(_cfg(folder, 'trainer.max_duration=3ba'))
