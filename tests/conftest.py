"""Shared helpers for the CPU tests: repo paths and a real Composer trainer built from a run YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# The tiny models gain nothing from intra-op threads, and on a 2-core machine shared with other processes
# OpenMP oversubscription makes a 1 s tiny run take a minute. OMP_NUM_THREADS, if set, wins.
if 'OMP_NUM_THREADS' not in os.environ:
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
YAMLS = REPO / 'yamls'


def _snapshot(module) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder:
    """A Composer callback (built lazily so conftest imports no Composer) recording each batch's logged losses,
    ``batches_seen`` and, optionally, weight snapshots of the named DMD sub-networks at ``Event.BATCH_END``."""

    def __new__(cls, snapshot: tuple[str, ...] = ()):
        from composer.core import Callback

        class _Recorder(Callback):

            def __init__(self):
                self.losses: list[dict[str, float]] = []
                self.batches_seen_history: list[int] = []
                self.snapshots: list[dict[str, dict[str, Any]]] = []
                self.initial: dict[str, dict[str, Any]] = {}

            def fit_start(self, state, logger):
                self.initial = {n: _snapshot(getattr(state.model, n)) for n in snapshot}

            def batch_end(self, state, logger):
                self.losses.append({k: float(v) for k, v in state.total_loss_dict.items()})
                self.batches_seen_history.append(int(state.model.batches_seen))
                if snapshot:
                    self.snapshots.append({n: _snapshot(getattr(state.model, n)) for n in snapshot})

        return _Recorder()


@pytest.fixture(scope='session')
def make_trainer() -> Callable:
    """``make_trainer(yaml_name, overrides, snapshot=(), drop_algorithms=False, edit=None) -> (trainer, recorder)``.

    Loads ``yamls/<yaml_name>.yaml`` with the dotted overrides, validates it, optionally lets ``edit(cfg)`` change
    the config in place (validated again), builds the real Composer ``Trainer``
    with :func:`senseflow_algos.builders.build_trainer` and attaches a :class:`Recorder`.
    """

    def make(yaml_name: str, overrides=(), snapshot: tuple[str, ...] = (), drop_algorithms: bool = False,
             edit: Callable[[dict], None] | None = None):
        from senseflow_algos.builders import build_trainer
        from senseflow_algos.config import load_config, validate_config

        path = YAMLS / f'{yaml_name}.yaml'
        cfg = load_config(path, ['trainer.progress_bar=false', *overrides])
        validate_config(cfg, source=str(path))
        if drop_algorithms:
            cfg.pop('algorithms', None)
        if edit is not None:
            edit(cfg)
            validate_config(cfg, source=f'{path} (edited)')
        trainer = build_trainer(cfg)
        recorder = Recorder(snapshot)
        trainer.state.callbacks.append(recorder)
        return trainer, recorder

    return make
