"""Shared helpers for the algorithm tests: tiny trainers and weight snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from senseflow_algos.builders import build_trainer
from senseflow_algos.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[2]


def tiny_config(algorithms: Optional[dict[str, Any]], *overrides: str, family: str = 'flux') -> dict[str, Any]:
    """The tiny config of ``family`` with exactly ``algorithms`` and quiet, short trainer settings."""
    cfg = load_config(REPO / 'yamls' / f'tiny_{family}.yaml',
                      ['trainer.progress_bar=false', 'trainer.max_duration=3ba', *overrides])
    cfg['algorithms'] = algorithms or {}
    validate_config(cfg)
    return cfg


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EventRecorder(Callback):
    """Calls ``fn(event, state)`` on every event; collects whatever ``fn`` returns (if not ``None``)."""

    def __init__(self, fn: Callable[[Event, State], Any]):
        self.fn, self.records = fn, []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        record = self.fn(event, state)
        if record is not None:
            self.records.append(record)


class LossRecorder(Callback):
    """The per-batch logged loss dict (floats) at ``Event.BATCH_END``."""

    def __init__(self):
        self.losses: list[dict[str, float]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append({k: float(v) for k, v in state.total_loss_dict.items()})


@pytest.fixture
def algo_trainer(tmp_path):
    """``algo_trainer(cfg, callbacks=[...], **trainer_kwargs_overrides)`` builds a Trainer from a config dict."""
    trainers = []

    def _make(cfg: dict[str, Any], callbacks=(), **trainer_overrides):
        cfg = {**cfg, 'trainer': {**cfg['trainer'], **trainer_overrides}}
        trainer = build_trainer(cfg)
        for cb in callbacks:
            trainer.state.callbacks.append(cb)
        trainers.append(trainer)
        return trainer

    yield _make
    for trainer in trainers:
        trainer.close()
