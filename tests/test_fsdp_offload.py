"""The CPU offload switch: ``trainer.parallelism_config.fsdp.cpu_offload`` is taken out of what Composer sees,
refused under FSDP1 (which Composer 0.32.1 cannot offload) before any model is built, and turns into FSDP2's
``CPUOffloadPolicy`` on every ``fully_shard`` Composer applies. Training with it: tests/distributed/."""

from __future__ import annotations

import copy

import pytest
import torch
from composer.distributed import fsdp2 as composer_fsdp2
from torch.distributed.fsdp import CPUOffloadPolicy

from senseflow_algos.builders import build_trainer
from senseflow_algos.config import load_config
from senseflow_algos.models.fsdp_offload import GPUWithCPUCollectives, fsdp2_cpu_offload, pop_cpu_offload

TRAINER = {'max_duration': '1ba', 'parallelism_config': {'fsdp': {'state_dict_type': 'sharded', 'cpu_offload': True}}}


def test_pop_takes_the_key_out_without_touching_the_config():
    before = copy.deepcopy(TRAINER)
    rest, offload = pop_cpu_offload(TRAINER, fsdp_version='2')
    assert offload is True and TRAINER == before
    assert rest == {'max_duration': '1ba', 'parallelism_config': {'fsdp': {'state_dict_type': 'sharded'}}}
    off = {**TRAINER, 'parallelism_config': {'fsdp': {'cpu_offload': False}}}
    assert pop_cpu_offload(off, fsdp_version='1') == ({**TRAINER, 'parallelism_config': {'fsdp': {}}}, False)
    plain = {'max_duration': '1ba', 'parallelism_config': None}
    assert pop_cpu_offload(plain, fsdp_version='1') == (plain, False)


def test_fsdp1_and_non_bool_values_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r'trainer\.parallelism_config\.fsdp\.cpu_offload=true needs FSDP2'):
        pop_cpu_offload(TRAINER, fsdp_version='1')
    bad = {**TRAINER, 'parallelism_config': {'fsdp': {'cpu_offload': 'yes'}}}
    with pytest.raises(ValueError, match=r"cpu_offload must be true or false, got 'yes'"):
        pop_cpu_offload(bad, fsdp_version='2')


def test_build_trainer_refuses_fsdp1_offload_before_building_a_model(monkeypatch):
    monkeypatch.delenv('FSDP_VERSION', raising=False)
    cfg = load_config('yamls/tiny_flux.yaml', ['trainer.parallelism_config={fsdp: {cpu_offload: true}}'])
    monkeypatch.setattr('senseflow_algos.builders.build_model', lambda *a, **k: pytest.fail('model was built'))
    with pytest.raises(ValueError, match='needs FSDP2'):
        build_trainer(cfg)


def test_every_fully_shard_inside_the_block_gets_the_offload_policy(monkeypatch):
    calls = []
    monkeypatch.setattr(composer_fsdp2, 'fully_shard', lambda module, **kwargs: calls.append((module, kwargs)))
    patched = composer_fsdp2.fully_shard
    block, root = torch.nn.Linear(2, 2), torch.nn.Sequential()
    with fsdp2_cpu_offload(pin_memory=False) as count:
        composer_fsdp2.fully_shard(block, reshard_after_forward=True)
        composer_fsdp2.fully_shard(root)
    assert composer_fsdp2.fully_shard is patched, 'the original fully_shard is back after the block'
    assert count.modules == 2 and [c[0] for c in calls] == [block, root]
    for _, kwargs in calls:
        assert isinstance(kwargs['offload_policy'], CPUOffloadPolicy) and kwargs['offload_policy'].pin_memory is False
    assert calls[0][1]['reshard_after_forward'] is True


def test_gpu_device_gets_a_gloo_backend_for_cpu_shards():
    assert GPUWithCPUCollectives.dist_backend == 'cuda:nccl,cpu:gloo'
    assert str(torch.distributed.Backend(GPUWithCPUCollectives.dist_backend)) == GPUWithCPUCollectives.dist_backend
