"""Helpers shared by the SenseFlow algorithms."""

from __future__ import annotations

from composer.core import State
from torch.nn.parallel import DistributedDataParallel

from senseflow_algos.models.dmd import DMDModel

__all__ = ['get_dmd_model']


def get_dmd_model(state: State, algorithm: str) -> DMDModel:
    """The :class:`DMDModel` behind ``state.model`` (unwrapping DDP), or a clear error naming ``algorithm``."""
    model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
    if not isinstance(model, DMDModel):
        raise TypeError(f'{algorithm} needs a senseflow_algos DMDModel, got {type(model).__name__}')
    return model

