"""The shapes world as a plugin: ``dataset.kind: shapes`` and ``callbacks.shapes_report``.

It registers its names with the same public calls a user's plugin makes (:mod:`senseflow_algos.registry`); the
library only knows this module's path (``register_lazy``), so it is imported when a config names ``shapes`` or
``shapes_report``. A plugin of your own is a module like this one, listed under ``plugins:`` in the run YAML.
"""

from senseflow_algos.registry import CALLBACKS, DATASETS
from senseflow_algos.shapes.report import ShapesReport
from senseflow_algos.shapes.world import build_shapes_dataloader

__all__: list[str] = []

DATASETS.register('shapes', build_shapes_dataloader)
CALLBACKS.register('shapes_report', ShapesReport)
