"""The launch planner: ``python -m senseflow_algos.plan yamls/flux.yaml [overrides] --gpus 8 --gpu-memory 80GB``.

Builds every network of a run config on the meta device from the shipped architecture configs, applies the project's
FSDP wrapping and options, and reports per-network parameters and FSDP units, per-GPU memory (weights, gradients,
optimizer state, activations with and without checkpointing, FSDP transients, peak), host RAM at start-up, FLOPs per
generator update and time at a stated MFU, and whether the run fits (with the smallest change that does if not).

Public names are imported lazily, so that the command line rejects a bad config before torch loads.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    'HUB_IDS': 'senseflow_algos.plan.architectures',
    'architecture_folder': 'senseflow_algos.plan.architectures',
    'PEAK_TFLOPS': 'senseflow_algos.plan.planner',
    'Fix': 'senseflow_algos.plan.planner',
    'Hardware': 'senseflow_algos.plan.planner',
    'Plan': 'senseflow_algos.plan.planner',
    'PlanCache': 'senseflow_algos.plan.planner',
    'find_fix': 'senseflow_algos.plan.planner',
    'plan_run': 'senseflow_algos.plan.planner',
    'format_plan': 'senseflow_algos.plan.report',
    'plan_summary': 'senseflow_algos.plan.report',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(import_module(_EXPORTS[name]), name)
