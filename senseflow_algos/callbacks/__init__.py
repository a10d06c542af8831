"""Composer callbacks for watching and shipping a distilled student: sample grids during training and a diffusers
export at the end of training."""

from senseflow_algos.callbacks.export_pipeline import ExportPipeline
from senseflow_algos.callbacks.sample_grid import DEFAULT_PROMPTS, SampleGrid, run_folder

__all__ = ['SampleGrid', 'ExportPipeline', 'DEFAULT_PROMPTS', 'run_folder']
