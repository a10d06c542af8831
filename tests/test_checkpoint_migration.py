"""Checkpoints written before the batch counter was renamed (``ttur_step`` -> ``batches_seen``): an unsharded one
loads as it is (``tests/test_resume.py``, ``tests/test_dmd_model.py``); a sharded one after a one-line migration."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from senseflow_algos.checkpointing import (
    SHARDED_METADATA,
    CheckpointError,
    check_before_load,
    migrate_sharded_checkpoint,
)


def _current():
    return {'state': {'model': {'batches_seen': torch.tensor(0), 'generator.w': torch.zeros(8)}}}


def test_sharded_checkpoint_with_the_old_counter_key_loads_after_migration(tmp_path):
    folder = tmp_path / 'ep0-ba3'
    old = {'state': {'model': {'ttur_step': torch.tensor(3), 'generator.w': torch.arange(8.0)}}}
    dcp.save(old, checkpoint_id=str(folder), no_dist=True)
    with pytest.raises(CheckpointException, match='batches_seen'):
        dcp.load(_current(), checkpoint_id=str(folder), no_dist=True)  # what a resume would hit
    # Before the model is built, trainer.load_path names the migration.
    with pytest.raises(CheckpointError, match='migrate_sharded_checkpoint as m; m'):
        check_before_load({'load_path': str(folder)}, None, 0)
    assert migrate_sharded_checkpoint(folder) == ['state.model.ttur_step']
    check_before_load({'load_path': str(folder)}, None, 0)
    state = _current()
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    assert int(state['state']['model']['batches_seen']) == 3
    assert torch.equal(state['state']['model']['generator.w'], torch.arange(8.0))
    assert migrate_sharded_checkpoint(folder) == []  # idempotent
    with open(folder / SHARDED_METADATA, 'rb') as f:
        metadata = pickle.load(f)
    # Composer reads the top-level keys from the planner data (for its optimizer-at-root check).
    assert {v[0] for v in metadata.planner_data.values()} == {'state'}
    assert ('state', 'model', 'batches_seen') in metadata.planner_data.values()


def test_migration_refuses_unsharded_files(tmp_path):
    path = tmp_path / 'ep0-ba3-rank0.pt'
    torch.save({'state': {'model': {'ttur_step': torch.tensor(3)}}}, path)
    with pytest.raises(CheckpointError, match='not a sharded'):
        migrate_sharded_checkpoint(path)
