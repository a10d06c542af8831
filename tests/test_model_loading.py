"""Loading a teacher from a saved pipeline folder: dtypes per network (``model.dtype`` / ``teacher_dtype`` /
``encoder_dtype``), the meta-device build of a lean start, and the lean-start decision and hand-over.

The dtype expectations are the rule the issue states (trained networks ``model.dtype``; teacher ``teacher_dtype``,
else ``dtype``; VAE and text encoders ``encoder_dtype``, else ``teacher_dtype``, else ``dtype``); the meta build is
compared with what diffusers' own ``from_pretrained`` loads.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from senseflow_algos.models.factory import build_dmd_model, build_encoders
from senseflow_algos.models.families import get_family
from senseflow_algos.models.tiny import save_tiny_pipeline

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(scope='module', params=['flux', 'sd35'])
def folder(request, tmp_path_factory):
    return request.param, save_tiny_pipeline(request.param, tmp_path_factory.mktemp(request.param) / 'pipe', seed=5)


def _dtypes(module: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def _layout(module: nn.Module) -> dict[str, tuple]:
    tensors = {**dict(module.named_parameters()), **{f'buffer:{k}': v for k, v in module.named_buffers()}}
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


@pytest.mark.parametrize('dtypes, expected', [
    ({'dtype': 'fp32', 'teacher_dtype': 'bf16'}, (FP32, BF16, BF16)),
    ({'dtype': 'bf16'}, (BF16, BF16, BF16)),
    ({'dtype': 'fp32', 'teacher_dtype': 'bf16', 'encoder_dtype': 'fp32'}, (FP32, BF16, FP32)),
])
def test_dtype_per_network(folder, dtypes, expected):
    family, path = folder
    trained, teacher, encoders = expected
    model = build_dmd_model(family, resolution=32, pretrained=str(path), **dtypes)
    assert _dtypes(model.generator) == _dtypes(model.fake_score) == {trained}
    assert _dtypes(model.teacher) == {teacher}
    assert _dtypes(model.vae) == _dtypes(model.conditioner) == {encoders}
    _, conditioner, vae = build_encoders(family, pretrained=str(path), **dtypes)  # what data_prep encodes with
    assert _dtypes(conditioner) == _dtypes(vae) == {encoders}


def test_bad_encoder_dtype_is_named(folder):
    family, path = folder
    with pytest.raises(ValueError, match=r"model.encoder_dtype='int8'"):
        build_dmd_model(family, resolution=32, pretrained=str(path), encoder_dtype='int8')


def test_meta_build_has_the_loaded_layout(folder):
    family, path = folder
    fam = get_family(family)
    kwargs = dict(torch_dtype=FP32, teacher_dtype=BF16, encoder_dtype=BF16)
    loaded = fam.load_components(str(path), **kwargs)
    meta = fam.load_components(str(path), transformers_on_meta=True, **kwargs)
    cls = type(loaded.teacher)
    reference = cls.from_pretrained(str(path), subfolder='transformer', torch_dtype=BF16)  # diffusers alone
    assert _layout(meta.teacher) == _layout(loaded.teacher) == _layout(reference)
    assert _layout(meta.student) == _layout(loaded.student)
    assert all(t.is_meta for t in [*meta.teacher.parameters(), *meta.teacher.buffers(), *meta.student.parameters()])
    assert not meta.teacher.training and dict(meta.teacher.config) == dict(reference.config)
    # VAE and text encoders are loaded on every rank, with their weights.
    for name in ('vae', 'conditioner'):
        a, b = getattr(meta, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_meta_build_is_for_pretrained_only():
    with pytest.raises(ValueError, match='transformers_on_meta'):
        build_dmd_model('flux', resolution=32, tiny=True, transformers_on_meta=True)


def test_lean_start_decision(monkeypatch, capsys):
    from composer.utils import dist

    from senseflow_algos.models.fsdp import LEAN_START_ENV, lean_start

    monkeypatch.setattr(dist, 'get_world_size', lambda: 8)
    monkeypatch.delenv(LEAN_START_ENV, raising=False)
    cfg = {'pretrained': '/some/folder'}
    assert lean_start(cfg, fsdp=True)
    assert 'the other 7 ranks build them on the meta device' in capsys.readouterr().out
    assert not lean_start(cfg, fsdp=False)
    assert not lean_start({'tiny': True}, fsdp=True)
    assert not lean_start(cfg, fsdp=True, cpu_offload=True)
    monkeypatch.setenv(LEAN_START_ENV, '0')
    assert not lean_start(cfg, fsdp=True)
    monkeypatch.delenv(LEAN_START_ENV)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 1)
    assert not lean_start(cfg, fsdp=True)


def test_lean_start_trainer_config_sets_fsdp1_sync_only():
    from senseflow_algos.models.fsdp import lean_start_trainer_config

    cfg = {'precision': 'amp_bf16',
           'parallelism_config': {'fsdp': {'sync_module_states': False, 'use_orig_params': True}}}
    fsdp1 = lean_start_trainer_config(cfg, '1')
    assert fsdp1['parallelism_config']['fsdp'] == {'sync_module_states': True, 'use_orig_params': True}
    assert cfg['parallelism_config']['fsdp']['sync_module_states'] is False  # not modified
    assert lean_start_trainer_config(cfg, '2') is cfg  # FSDP2 has no such key; Composer turns it on by itself


def test_lean_start_hand_over_restores_children_and_refuses_meta(folder):
    """The replicated children sit out while the Trainer wraps and come back in place; a meta tensor left is named."""
    from types import SimpleNamespace

    from senseflow_algos.models.fsdp import prepare_lean_start

    family, path = folder
    model = build_dmd_model(family, resolution=32, pretrained=str(path))
    for name in ('vae', 'conditioner'):
        getattr(model, name)._fsdp_wrap = False  # as prepare_for_fsdp sets it
    order = [name for name, _ in model.named_children()]
    vae, conditioner = model.vae, model.conditioner
    check = prepare_lean_start(model)
    assert not list(model.vae.parameters()) and not list(model.conditioner.parameters())
    assert model.keep_frozen_in_state_dict and any(k.startswith('teacher.') for k in model.state_dict())
    check.before_load(SimpleNamespace(model=model), logger=None)
    assert model.vae is vae and model.conditioner is conditioner
    assert [name for name, _ in model.named_children()] == order
    assert not model.keep_frozen_in_state_dict and not any(k.startswith('teacher.') for k in model.state_dict())
    model.teacher = model.teacher.to('meta')
    with pytest.raises(RuntimeError, match=r'parameter teacher\.\S+ is still on the meta device'):
        prepare_lean_start(model).before_load(SimpleNamespace(model=model), logger=None)
