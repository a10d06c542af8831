"""``gather_generator`` (the ``export_pipeline`` callback under FSDP): an FSDP2-sharded generator, plain or with a
``model.lora`` adapter, comes back on rank 0 as a plain diffusers module with every tensor equal to the original. One
gloo process (world size 1) in this test process; the 2-process runs are in tests/distributed/test_export_sharded.py."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as torch_dist

from senseflow_algos.callbacks.export_pipeline import gather_generator
from senseflow_algos.models.families import get_family


@pytest.fixture()
def one_process_group():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    torch_dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize('lora', [False, True], ids=['plain', 'lora'])
def test_gathered_generator_equals_the_sharded_one(one_process_group, lora):
    from torch.distributed.fsdp import fully_shard

    net = get_family('flux').tiny_components(seed=3).student
    if lora:
        from senseflow_algos.models.lora import apply_lora

        apply_lora(net, rank=4, alpha=8)
        with torch.no_grad():  # fresh adapters have lora_B = 0; give them weights that show in the output
            for name, param in net.named_parameters():
                if 'lora_B' in name:
                    param.normal_(std=0.1)
    want = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sharded = copy.deepcopy(net)
    for block in [*sharded.transformer_blocks, *sharded.single_transformer_blocks]:
        fully_shard(block)
    fully_shard(sharded)
    gathered = gather_generator(sharded)
    assert type(gathered).__name__ == type(net).__name__  # a plain diffusers class, not FSDP's subclass
    got = gathered.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert not [n for n, t in gathered.named_parameters() if t.is_meta]
    if lora:
        assert any('lora_A' in k for k in got)
        x = {'hidden_states': torch.randn(1, 16, net.config.in_channels), 'timestep': torch.tensor([0.5]),
             'encoder_hidden_states': torch.randn(1, 8, net.config.joint_attention_dim),
             'pooled_projections': torch.randn(1, net.config.pooled_projection_dim),
             'txt_ids': torch.zeros(8, 3), 'img_ids': torch.zeros(16, 3), 'return_dict': False}
        with torch.no_grad():
            torch.testing.assert_close(gathered(**x)[0], net(**x)[0], rtol=0, atol=0)
