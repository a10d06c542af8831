"""``sample_grid``: every N batches, render fixed prompts with the student in 4 steps, log a grid and write PNGs."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist

from senseflow_algos import limits
from senseflow_algos.algorithms.utils import get_dmd_model
from senseflow_algos.registry import CALLBACKS
from senseflow_algos.sampling import DEFAULT_METHOD, METHODS, images_to_pil, sample

log = logging.getLogger(__name__)

__all__ = ['SampleGrid', 'DEFAULT_PROMPTS', 'run_folder']

#: Prompts rendered when none are configured.
DEFAULT_PROMPTS = (
    'a red circle above a blue square',
    'a green triangle left of a yellow star',
    'a photo of a small white heart on a black background',
    'a large purple hexagon next to an orange diamond',
)


def run_folder(state: State) -> Path:
    """The run's local folder: the checkpoint folder (``trainer.save_folder``) if the run saves checkpoints, else
    ``runs/<run_name>``."""
    from composer.callbacks import CheckpointSaver

    for cb in state.callbacks:
        if isinstance(cb, CheckpointSaver):
            return Path(format_name_with_dist(str(cb.folder), state.run_name))
    return Path('runs') / str(state.run_name)


@CALLBACKS.register('sample_grid')
class SampleGrid(Callback):
    """Render fixed prompts with the student every ``every_n_batches`` batches.

    The same prompts and the same seed are used every time, so grids from different batches show how the student
    changes. Each render is logged through Composer's ``logger.log_images`` (the wandb logger shows it) and written as
    ``<folder>/ba<batch>.png``; ``<folder>/prompts.txt`` lists the prompts in grid order. Sampling uses a private
    ``torch.Generator``, so a run with this callback trains exactly as one without it. Under FSDP every rank samples
    (the forward is collective) and rank 0 writes.

    Args:
        every_n_batches (int): Render interval in batches. Default: ``500``.
        prompts (Sequence[str], optional): Prompts to render. Default: :data:`DEFAULT_PROMPTS`.
        seed (int): Seed of the sampling noise. Default: ``0``.
        method (str): ``'renoise'`` (default) or ``'euler'``.
        folder (str, optional): Where PNGs go. Default: ``<run folder>/samples`` (see :func:`run_folder`).
        nrow (int, optional): Images per grid row. Default: ``ceil(sqrt(len(prompts)))``.
        at_fit_start (bool): Also render before the first batch (the initial student). Default: ``False``.
        at_fit_end (bool): Also render at the end of training if the last batch was not rendered. Default: ``True``.
        log_name (str): Name of the logged image. Default: ``'samples'``.
    """

    def __init__(self, every_n_batches: int = 500, prompts: Optional[Sequence[str]] = None, seed: int = 0,
                 method: str = DEFAULT_METHOD, folder: Optional[str] = None, nrow: Optional[int] = None,
                 at_fit_start: bool = False, at_fit_end: bool = True, log_name: str = 'samples'):
        limits.check('callbacks.sample_grid.every_n_batches', every_n_batches)
        if method not in METHODS:
            raise ValueError(f'callbacks.sample_grid.method={method!r} is not known; choose one of {list(METHODS)}')
        prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f'callbacks.sample_grid.prompts must be a non-empty list of strings, got {prompts!r}')
        self.every_n_batches = every_n_batches
        self.prompts = prompts
        self.seed = seed
        self.method = method
        self.folder = folder
        self.nrow = nrow or math.ceil(math.sqrt(len(prompts)))
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.log_name = log_name
        self.last_rendered: Optional[int] = None
        #: Paths of the PNG grids written so far (rank 0).
        self.written: list[Path] = []

    def _folder(self, state: State) -> Path:
        if self.folder is not None:
            return Path(format_name_with_dist(self.folder, state.run_name))
        return run_folder(state) / 'samples'

    def render(self, state: State, logger: Logger) -> Optional[Path]:
        """Sample the prompts now, log the grid and write it; returns the PNG path on rank 0."""
        from torchvision.utils import make_grid

        model = get_dmd_model(state, 'callbacks.sample_grid')
        if model.conditioner is None:
            raise RuntimeError('callbacks.sample_grid renders prompts with the text encoders, but this model has none '
                               '(model.text_encoders=false); remove the callback or load the text encoders')
        batch = int(state.timestamp.batch)
        rng = torch.Generator(device=model.device).manual_seed(self.seed)
        images = sample(model, self.prompts, rng=rng, method=self.method).images
        self.last_rendered = batch
        grid = make_grid(images.float().cpu(), nrow=self.nrow, padding=2, pad_value=1.0)
        logger.log_images(grid.unsqueeze(0), name=self.log_name, step=batch, use_table=False)
        if dist.get_global_rank() != 0:
            return None
        folder = self._folder(state)
        folder.mkdir(parents=True, exist_ok=True)
        prompts_file = folder / 'prompts.txt'
        if not prompts_file.exists():
            prompts_file.write_text('\n'.join(self.prompts) + '\n')
        path = folder / f'ba{batch:07d}.png'
        images_to_pil(grid.unsqueeze(0))[0].save(path)
        self.written.append(path)
        log.info('sample grid at batch %d written to %s', batch, path)
        return path

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.at_fit_start and int(state.timestamp.batch) == 0:
            self.render(state, logger)

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.every_n_batches == 0:
            self.render(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.at_fit_end and self.last_rendered != int(state.timestamp.batch):
            self.render(state, logger)
