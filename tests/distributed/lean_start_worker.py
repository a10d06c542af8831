"""Builds a run with the old start and with the lean start in one pair of gloo CPU processes, through
``builders.build_trainer``, under FSDP1 and FSDP2, and saves what each rank holds (for test_lean_start.py).

    python -m composer.cli.launcher -n 2 tests/distributed/lean_start_worker.py OUT NAME yamls/x.yaml [k=v ...]

For each FSDP version (``FSDP_VERSION`` is set per build; Composer reads it when the Trainer is built) and start
(``old``: ``SENSEFLOW_LEAN_START=0``; ``lean``: the default), each rank writes ``OUT/<NAME>-fsdp<v>-<start>-rank<r>.pt``
with whether this rank built each transformer on the meta device, and, right after the Trainer wrapped the model and
again after ``fit``, the full (all-gathered) state dict of every network, the frozen ones included, and every buffer of
the model (non-persistent ones too).

FSDP1 runs on CPU processes with the patches of fsdp1_cpu_train.py, plus two that a CUDA device makes unnecessary:
Composer materialises a meta-device module with ``to_empty(device=f'cuda:{torch.cuda.current_device()}')``, which
those patches turn into ``'cuda:cpu'`` (here: the CPU), and torch's FSDP1 refuses ``sync_module_states`` on CPU
tensors, which gloo broadcasts all the same (on GPUs FSDP1 moves each unit to its ``device_id`` before broadcasting).
None of them changes anything for FSDP2 on CPU processes.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed.fsdp._init_utils as fsdp_init_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tests.distributed.fsdp1_cpu_train  # noqa: E402,F401  (its CPU patches)

_to_empty = torch.nn.Module.to_empty


def _to_empty_cpu(self, *, device, recurse=True):
    return _to_empty(self, device='cpu' if str(device) == 'cuda:cpu' else device, recurse=recurse)


torch.nn.Module.to_empty = _to_empty_cpu
fsdp_init_utils._check_module_states_for_sync_module_states = lambda module_states: None

import senseflow_algos.builders as builders  # noqa: E402
from senseflow_algos.config import load_config, validate_config  # noqa: E402
from senseflow_algos.models.fsdp import LEAN_NETWORKS, LEAN_START_ENV  # noqa: E402


def _full_state(model) -> dict[str, torch.Tensor]:
    """Every network's full tensors (frozen ones included) and every buffer, the same on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.keep_frozen_in_state_dict = True
    try:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    finally:
        model.keep_frozen_in_state_dict = False
    state = {k: v.detach().clone() for k, v in state.items()}
    state.update({f'buffer:{k.replace("_fsdp_wrapped_module.", "")}': v.detach().clone()
                  for k, v in model.named_buffers()})
    return state


def _recording_build_model(build_model, built_on_meta: dict[str, bool], *args, **kwargs):
    model = build_model(*args, **kwargs)
    built_on_meta.update({name: next(getattr(model, name).parameters()).is_meta for name in LEAN_NETWORKS})
    return model


def run(out: Path, name: str, argv: list[str], version: str, start: str) -> None:
    os.environ['FSDP_VERSION'] = version
    os.environ[LEAN_START_ENV] = '0' if start == 'old' else '1'
    build_model, built_on_meta = builders.build_model, {}
    builders.build_model = functools.partial(_recording_build_model, build_model, built_on_meta)
    try:
        cfg = load_config(argv[0], argv[1:])
        validate_config(cfg, source=argv[0])
        trainer = builders.build_trainer(cfg)
    finally:
        builders.build_model = build_model
    record = {'built_on_meta': built_on_meta, 'wrapped': _full_state(trainer.state.model)}
    path = out / f'{name}-fsdp{version}-{start}-rank{os.environ["RANK"]}.pt'
    torch.save(record, path)  # also when training fails
    trainer.fit()
    record['trained'] = _full_state(trainer.state.model)
    trainer.close()
    torch.save(record, path)


def main(out: str, name: str, config: list[str]) -> None:
    for version in ('1', '2'):
        for start in ('old', 'lean'):
            run(Path(out), name, config, version, start)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
