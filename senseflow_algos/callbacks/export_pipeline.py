"""``export_pipeline``: at the end of training, write the student as a diffusers pipeline folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist

from senseflow_algos.algorithms.utils import get_dmd_model
from senseflow_algos.callbacks.sample_grid import run_folder
from senseflow_algos.sampling import METHODS

log = logging.getLogger(__name__)

__all__ = ['ExportPipeline']


class ExportPipeline(Callback):
    """At ``Event.FIT_END``, export the generator with :func:`senseflow_algos.export.export_pipeline` (rank 0).

    Under FSDP the generator's parameters are sharded; the callback then skips with a warning, and the final
    checkpoint is exported with ``python export.py``.

    Args:
        folder (str, optional): Output folder (``{run_name}`` is formatted). Default: ``<run folder>/export``
            (see :func:`~senseflow_algos.callbacks.run_folder`).
        method (str): The sampler the exported scheduler reproduces: ``'renoise'`` (default) or ``'euler'``.
        dtype (str, optional): ``fp32``, ``bf16`` or ``fp16`` for the saved transformer. Default: as trained.
        bare (bool): Also write ``generator.safetensors``. Default: ``True``.
    """

    def __init__(self, folder: Optional[str] = None, method: str = 'renoise', dtype: Optional[str] = None,
                 bare: bool = True):
        if method not in METHODS:
            raise ValueError(f'callbacks.export_pipeline.method={method!r} is not known; choose one of '
                             f'{list(METHODS)}')
        if dtype is not None and dtype not in ('fp32', 'bf16', 'fp16'):
            raise ValueError(f"callbacks.export_pipeline.dtype={dtype!r} is not one of ['bf16', 'fp16', 'fp32']")
        self.folder = folder
        self.method = method
        self.dtype = dtype
        self.bare = bare
        #: The folder written (rank 0), once the export ran.
        self.exported: Optional[Path] = None

    def fit_end(self, state: State, logger: Logger) -> None:
        from senseflow_algos.export import export_pipeline

        if state.fsdp_enabled:
            log.warning('callbacks.export_pipeline: the generator is sharded by FSDP; skipping the export. Export the '
                        'final checkpoint with: python export.py <save_folder> <out> --config <run yaml>')
            return
        model = get_dmd_model(state, 'callbacks.export_pipeline')
        if model.conditioner is None or getattr(model.vae, 'encoder', True) is None:
            raise RuntimeError('callbacks.export_pipeline needs the text encoders and the full VAE, but this model was '
                               'built without them (model.text_encoders / model.vae_encoder = false); export the '
                               'checkpoint with python export.py ... model.text_encoders=true model.vae_encoder=true')
        if dist.get_global_rank() == 0:
            folder = (Path(format_name_with_dist(self.folder, state.run_name)) if self.folder is not None else
                      run_folder(state) / 'export')
            self.exported = export_pipeline(model, folder, method=self.method, dtype=self.dtype, bare=self.bare,
                                            source=f'run {state.run_name} at batch {int(state.timestamp.batch)}')
            log.info('exported the student to %s', self.exported)
        dist.barrier()
