"""``export_pipeline``: at the end of training, write the student as a diffusers pipeline folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist
from torch import nn

from senseflow_algos.algorithms.utils import get_dmd_model
from senseflow_algos.callbacks.sample_grid import run_folder
from senseflow_algos.dtypes import DTYPES
from senseflow_algos.registry import CALLBACKS
from senseflow_algos.sampling import DEFAULT_METHOD, METHODS

log = logging.getLogger(__name__)

__all__ = ['ExportPipeline', 'gather_generator']


def _diffusers_class(net: nn.Module) -> type:
    """The diffusers class of a (possibly FSDP1-wrapped or FSDP2-sharded) transformer."""
    inner = getattr(net, 'module', net)  # FSDP1 wraps; FSDP2 swaps the class for an FSDP<name> subclass
    for cls in type(inner).__mro__:
        if cls.__module__.startswith('diffusers.'):
            return cls
    raise TypeError(f'the generator ({type(inner).__name__}) is not a diffusers model')


def gather_generator(generator: nn.Module) -> Optional[nn.Module]:
    """The full generator on global rank 0's CPU, from an FSDP1- or FSDP2-sharded one; ``None`` on other ranks.

    A collective: call it on every rank. The full state dict is gathered to rank 0 only, in CPU memory
    (``get_model_state_dict`` with ``full_state_dict`` and ``cpu_offload``); rank 0 builds a plain copy of the network
    on the meta device from its config and takes the gathered tensors as they are.

    FSDP1 on CPU processes (gloo, the tests) gathers without ``cpu_offload``, to every rank: there torch's FSDP1
    offload frees the storage of the gathered CPU parameters it then clones (a segmentation fault in torch 2.7).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1_on_cpu = isinstance(generator, FullyShardedDataParallel) and generator.compute_device.type == 'cpu'
    state = get_model_state_dict(generator, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=not fsdp1_on_cpu))
    if dist.get_global_rank() != 0:
        return None
    cls = _diffusers_class(generator)
    inner = getattr(generator, 'module', generator)
    with torch.device('meta'):
        net = cls.from_config(inner.config)
        for name, config in (getattr(inner, 'peft_config', None) or {}).items():  # a model.lora student
            net.add_adapter(config, adapter_name=name)
    net.load_state_dict(state, strict=True, assign=True)
    return net.requires_grad_(False).eval()


@CALLBACKS.register('export_pipeline')
class ExportPipeline(Callback):
    """At ``Event.FIT_END``, export the generator with :func:`senseflow_algos.export.export_pipeline` (rank 0).

    Under FSDP (FSDP1 or FSDP2) the generator's full state is first gathered to global rank 0's CPU
    (:func:`gather_generator`); rank 0 writes the pipeline while the other ranks wait at a barrier.

    Args:
        folder (str, optional): Output folder (``{run_name}`` is formatted). Default: ``<run folder>/export``
            (see :func:`~senseflow_algos.callbacks.run_folder`).
        method (str): The sampler the exported scheduler reproduces: ``'renoise'`` (default) or ``'euler'``.
        dtype (str, optional): ``fp32``, ``bf16`` or ``fp16`` for the saved transformer. Default: as trained.
        bare (bool): Also write ``generator.safetensors``. Default: ``True``.
    """

    def __init__(self, folder: Optional[str] = None, method: str = DEFAULT_METHOD, dtype: Optional[str] = None,
                 bare: bool = True):
        if method not in METHODS:
            raise ValueError(f'callbacks.export_pipeline.method={method!r} is not known; choose one of '
                             f'{list(METHODS)}')
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f'callbacks.export_pipeline.dtype={dtype!r} is not one of {sorted(DTYPES)}')
        self.folder = folder
        self.method = method
        self.dtype = dtype
        self.bare = bare
        #: The folder written (rank 0), once the export ran.
        self.exported: Optional[Path] = None

    def fit_end(self, state: State, logger: Logger) -> None:
        from senseflow_algos.export import export_pipeline, sampling_command
        from senseflow_algos.restore import StudentParts

        model = get_dmd_model(state, 'callbacks.export_pipeline')
        if model.conditioner is None or getattr(model.vae, 'encoder', True) is None:
            raise RuntimeError('callbacks.export_pipeline needs the text encoders and the full VAE, but this model was '
                               'built without them (model.text_encoders / model.vae_encoder = false); export the '
                               'checkpoint with python export.py ... model.text_encoders=true model.vae_encoder=true')
        source = f'run {state.run_name} at batch {int(state.timestamp.batch)}'
        student = model
        if state.fsdp_enabled:
            generator = gather_generator(model.generator)  # every rank takes part; rank 0 receives
            if generator is not None:
                student = StudentParts(model.family, generator, model.vae, model.conditioner, model.sigmas,
                                       tuple(model.latent_shape), model.scheduler_config, model.resolution, source)
        if dist.get_global_rank() == 0:
            folder = (Path(format_name_with_dist(self.folder, state.run_name)) if self.folder is not None else
                      run_folder(state) / 'export')
            self.exported = export_pipeline(student, folder, method=self.method, dtype=self.dtype, bare=self.bare,
                                            source=source)
            log.info('exported the student to %s', self.exported)
            print(f'\nThe student is exported to {self.exported}. Sample it (its resolution, prompt length, steps and '
                  f'sampler are in senseflow_export.json; a bare pipe(prompt) is not the trained call):\n'
                  f'{sampling_command(self.exported)}', flush=True)
        dist.barrier()
