"""Registries of the names a run config may use: ``algorithms:`` and ``callbacks:`` entries and ``dataset.kind``.

A name maps to a builder (a class or function called with the YAML kwargs). Library and plugin code register names
the same way, with :meth:`Registry.register`::

    from senseflow_algos.registry import CALLBACKS, DATASETS

    @DATASETS.register('my_kind')
    def build_my_dataloader(batch_size: int, resolution: int, seed: int, **dataset_kwargs) -> DataLoader: ...

    @CALLBACKS.register('my_callback')
    class MyCallback(Callback): ...

and a run config uses them once the module is imported: list it under ``plugins:`` in the YAML (``train.py`` imports
it before checking the config) or import it before calling the builders.

The names that ship with the library are registered by their own modules (the shapes world by
:mod:`senseflow_algos.shapes.plugin`, as a user's plugin would be); :meth:`Registry.register_lazy` tells the registry
which module registers a name, so a config is checked against every name without importing torch, and a module
loads only when its name is used.

This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar, overload

__all__ = ['Registry', 'UnknownNameError', 'ALGORITHMS', 'CALLBACKS', 'DATASETS']

T = TypeVar('T', bound=Callable[..., Any])


class UnknownNameError(KeyError, ValueError):
    """A name no one registered; the message names the YAML key and the known names.

    A ``KeyError`` (what a missing mapping key raises) and a ``ValueError`` (what a bad config value raises).
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Mapping[str, Callable[..., Any]]):
    """Names -> builders for one YAML key; a read-only mapping whose lookups import lazily registered modules.

    Args:
        key (str): The YAML key the names appear under, for messages: ``'callbacks'`` (names are entries of the
            section: ``callbacks.<name>``) or ``'dataset.kind'`` (names are values of the key).
        entries (bool): ``True`` when the names are entries of a section, ``False`` when they are values of ``key``.
        what (str): What a builder returns and takes, for docs and messages.
    """

    def __init__(self, key: str, entries: bool, what: str = ''):
        self.key, self.entries, self.what = key, entries, what
        self._builders: dict[str, Callable[..., Any]] = {}
        self._modules: dict[str, str] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]:
        ...

    @overload
    def register(self, name: str, builder: T) -> T:
        ...

    def register(self, name: str, builder: Optional[T] = None):
        """Register ``builder`` under ``name``; without ``builder``, a decorator that registers what it decorates.

        Registering the same builder again is a no-op (a module imported twice); another builder under a taken name
        is an error.

        Raises:
            ValueError: ``name`` is taken by another builder.
        """
        if builder is None:
            return lambda obj: self.register(name, obj)
        known = self._builders.get(name)
        if known is not None and known is not builder:
            raise ValueError(f'{self._where(name)} is already registered ({_qualname(known)}); '
                             f'{_qualname(builder)} cannot take it')
        self._builders[name] = builder
        return builder

    def register_lazy(self, name: str, module: str) -> None:
        """Declare that importing ``module`` registers ``name``: the name is known at once, the module is imported
        when the name is first looked up."""
        self._modules[name] = module

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests and interactive sessions)."""
        self._builders.pop(name, None)
        self._modules.pop(name, None)

    def names(self) -> list[str]:
        """Every known name, sorted (registered and lazily registered; imports nothing)."""
        return sorted({*self._builders, *self._modules})

    def is_lazy(self, name: str) -> bool:
        """Whether ``name`` was declared with :meth:`register_lazy` (the library's own names are)."""
        return name in self._modules

    def lookup(self, name: str) -> Callable[..., Any]:
        """The builder of ``name``, importing the module that registers it if needed.

        Raises:
            UnknownNameError: ``name`` is not known; the message names the YAML key and the known names.
        """
        if name not in self._builders and name in self._modules:
            importlib.import_module(self._modules[name])
            if name not in self._builders:
                raise UnknownNameError(f'{self._where(name)}: module {self._modules[name]} was to register it and '
                                       'did not')
        if name not in self._builders:
            raise UnknownNameError(self.unknown_message(name))
        return self._builders[name]

    def unknown_message(self, name: str) -> str:
        """``callbacks.foo is not known; choose from [...]`` / ``dataset.kind='foo' is not supported; ...``."""
        verb = 'is not known' if self.entries else 'is not supported'
        return (f'{self._where(name)} {verb}; choose from {self.names()} (a module listed under plugins: can '
                'register more, see senseflow_algos.registry)')

    def _where(self, name: str) -> str:
        return f'{self.key}.{name}' if self.entries else f'{self.key}={name!r}'

    # Mapping: ``name in registry`` and iteration import nothing; ``registry[name]`` is :meth:`lookup`.
    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.lookup(name)

    def __contains__(self, name: object) -> bool:
        return name in self._builders or name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f'Registry({self.key!r}, names={self.names()})'


def _qualname(obj: Any) -> str:
    return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", repr(obj))}'


#: ``algorithms:`` entry -> Composer ``Algorithm`` class (kwargs from YAML).
ALGORITHMS = Registry('algorithms', entries=True, what='Composer Algorithm')
#: ``callbacks:`` entry -> Composer ``Callback`` class (kwargs from YAML).
CALLBACKS = Registry('callbacks', entries=True, what='Composer Callback')
#: ``dataset.kind`` -> ``build(batch_size, resolution, seed, **dataset_kwargs) -> DataLoader`` (per-device batch
#: size; the other ``dataset:`` keys as kwargs).
DATASETS = Registry('dataset.kind', entries=False, what='DataLoader')

# Where the library's own names are registered (each module registers its names when imported).
for _name in ('ida', 'isg', 'vfm_discriminator'):
    ALGORITHMS.register_lazy(_name, 'senseflow_algos.algorithms.registered')
for _name in ('speed_monitor', 'lr_monitor', 'memory_monitor', 'runtime_estimator', 'optimizer_monitor'):
    CALLBACKS.register_lazy(_name, 'senseflow_algos.callbacks.composer_callbacks')
CALLBACKS.register_lazy('sample_grid', 'senseflow_algos.callbacks.sample_grid')
CALLBACKS.register_lazy('export_pipeline', 'senseflow_algos.callbacks.export_pipeline')
DATASETS.register_lazy('synthetic', 'senseflow_algos.data.synthetic')
for _name in ('image_caption', 'precomputed', 'prompts'):
    DATASETS.register_lazy(_name, 'senseflow_algos.data.streaming')
# The shapes world: a plugin like any user's (senseflow_algos/shapes/plugin.py).
DATASETS.register_lazy('shapes', 'senseflow_algos.shapes.plugin')
CALLBACKS.register_lazy('shapes_report', 'senseflow_algos.shapes.plugin')
