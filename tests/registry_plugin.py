"""A user's plugin, as ``plugins: [tests.registry_plugin]`` in a run YAML loads it (tests/test_registry.py): a
dataset kind with an option of its own and a callback, registered with the public calls of
:mod:`senseflow_algos.registry`."""

from __future__ import annotations

from composer.core import Callback

from senseflow_algos.data.synthetic import build_synthetic_dataloader
from senseflow_algos.registry import CALLBACKS, DATASETS


@DATASETS.register('plugin_squares')
def build_plugin_squares(batch_size: int, resolution: int, seed: int, num_samples: int = 16,
                         colour_offset: int = 0):
    """The synthetic squares, ``colour_offset`` samples further on (an option the schema does not know)."""
    loader = build_synthetic_dataloader(batch_size=batch_size, resolution=resolution, num_samples=num_samples,
                                        seed=seed)
    loader.colour_offset = colour_offset  # for the test to read back
    return loader


@CALLBACKS.register('plugin_batch_counter')
class BatchCounter(Callback):
    """Counts the batches it sees."""

    def __init__(self, label: str = 'batches'):
        self.label, self.batches = label, 0

    def batch_end(self, state, logger) -> None:
        self.batches += 1
