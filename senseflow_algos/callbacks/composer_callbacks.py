"""Registers the Composer built-in callbacks a run config may name (``callbacks: {speed_monitor: {}, ...}``), in one
place; the project's own callbacks register themselves in their modules."""

from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor

from senseflow_algos.registry import CALLBACKS

__all__: list[str] = []

CALLBACKS.register('speed_monitor', SpeedMonitor)
CALLBACKS.register('lr_monitor', LRMonitor)
CALLBACKS.register('memory_monitor', MemoryMonitor)
CALLBACKS.register('runtime_estimator', RuntimeEstimator)
CALLBACKS.register('optimizer_monitor', OptimizerMonitor)
