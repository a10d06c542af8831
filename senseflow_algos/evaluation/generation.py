"""Image sources (a diffusers pipeline folder, an exported SenseFlow student, a training checkpoint) and resumable
generation with one fixed seed per prompt.

Image ``i`` is generated from prompt ``i`` with a CPU ``torch.Generator`` seeded ``seed + i`` and written as
``<folder>/<i:05d>.png`` as soon as its batch is done; images already present are skipped, so an interrupted run
continues where it stopped. SenseFlow students (exported folders and checkpoints) are sampled with the in-repo sampler
on their own modules with one generator per image, so every image is the same whatever the batch size or the point of
resumption (``tests/test_export.py`` checks that this equals calling the exported pipeline). Other pipelines get one
generator per image for their initial noise; a stochastic scheduler's re-noise noise comes from the global RNG, seeded
with the batch's first seed.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from senseflow_algos.dtypes import DTYPES
from senseflow_algos.sampling import METHODS, SamplingComponents, images_to_pil, sample

__all__ = ['EvalError', 'ImageSource', 'PipelineSource', 'SamplerSource', 'open_source', 'generate_images',
           'image_path', 'load_images', 'free_memory', 'check_source_path', 'NFECounter', 'DTYPES']

class EvalError(ValueError):
    """An evaluation that cannot proceed; the message names the file, folder or value at fault."""


def image_path(folder: str | Path, index: int) -> Path:
    """``<folder>/<index:05d>.png``."""
    return Path(folder) / f'{index:05d}.png'


class NFECounter:
    """Counts network evaluations per image: rows of ``hidden_states`` passed to ``net`` (a CFG pass counts 2)."""

    def __init__(self, net: torch.nn.Module):
        self.rows = 0
        self.handle = net.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get('hidden_states', args[0] if args else None)
        if torch.is_tensor(x):
            self.rows += x.shape[0]

    def remove(self) -> None:
        self.handle.remove()


class ImageSource:
    """Something that turns prompts and seeds into images in [0, 1]. Subclasses implement :meth:`generate`."""

    def __init__(self, name: str, net: torch.nn.Module):
        self.name = name
        self._counter = NFECounter(net)
        self._images = 0

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1], image ``j`` from ``prompts[j]`` and ``seeds[j]``."""
        images = self._generate(list(prompts), list(seeds))
        self._images += images.shape[0]
        return images

    def _generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nfe(self) -> Optional[float]:
        """Network evaluations per image measured so far (``None`` before any image)."""
        return self._counter.rows / self._images if self._images else None

    def describe(self) -> dict[str, Any]:
        """What made the images (written to ``meta.json``; a folder is only resumed by the same source)."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the networks (frees memory before the next source loads)."""
        self._counter.remove()


def _cpu_rngs(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class SamplerSource(ImageSource):
    """A SenseFlow student sampled with :func:`senseflow_algos.sampling.sample` (one generator per image).

    Args:
        name (str): Row name in the table.
        components (SamplingComponents): Networks and anchors.
        method (str): ``'renoise'`` or ``'euler'``.
        description (dict): Where it came from (for ``meta.json``).
    """

    def __init__(self, name: str, components: SamplingComponents, method: str, description: dict[str, Any]):
        if method not in METHODS:
            raise EvalError(f'sampler method={method!r} is not known; choose one of {list(METHODS)}')
        super().__init__(name, components.net)
        self.components, self.method = components, method
        self.description = {**description, 'method': method,
                            'sigmas': [round(float(s), 6) for s in components.sigmas]}

    def _generate(self, prompts, seeds):
        return sample(self.components, prompts, rng=_cpu_rngs(seeds), method=self.method).images

    def describe(self):
        return dict(self.description)

    def close(self):
        super().close()
        self.components = None


class PipelineSource(ImageSource):
    """A diffusers pipeline called with ``output_type='pt'`` and ``call_kwargs`` (steps, guidance, size, ...)."""

    def __init__(self, name: str, pipe, call_kwargs: dict[str, Any], path: str):
        super().__init__(name, pipe.transformer if getattr(pipe, 'transformer', None) is not None else pipe.unet)
        self.pipe, self.call_kwargs, self.path = pipe, dict(call_kwargs), path
        pipe.set_progress_bar_config(disable=True)
        self.stochastic = bool(getattr(pipe.scheduler.config, 'stochastic_sampling', False))

    def _generate(self, prompts, seeds):
        if self.stochastic:  # the scheduler's re-noise noise comes from the global RNG
            torch.manual_seed(int(seeds[0]))  # seeds the CPU and every CUDA device
        out = self.pipe(prompt=prompts, generator=_cpu_rngs(seeds), output_type='pt', **self.call_kwargs)
        return out.images.float().cpu()

    def describe(self):
        return {'kind': 'pipeline', 'path': self.path, 'class': type(self.pipe).__name__,
                'call_kwargs': self.call_kwargs}

    def close(self):
        super().close()
        self.pipe = None


def _is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / 'model_index.json').is_file()


def check_source_path(path: str | Path) -> None:
    """Fail early, naming ``path``, unless it is a pipeline folder, a run folder with checkpoints or a checkpoint."""
    if '://' in str(path):
        return  # an object-store checkpoint: senseflow_algos.restore names what is missing
    path = Path(path)
    if not path.exists():
        raise EvalError(f'{path} does not exist')
    if path.is_dir():
        if (not _is_pipeline_folder(path) and not os.path.lexists(path / 'latest-rank0.pt') and
                not list(path.glob('*.pt')) and not (path / '.metadata').exists() and not list(path.glob('*/.metadata'))):
            raise EvalError(f'{path} is neither a diffusers pipeline folder (no model_index.json) nor a run folder '
                            'with checkpoints nor a sharded checkpoint')
    elif path.suffix not in ('.pt', '.safetensors'):
        raise EvalError(f'{path} is not a checkpoint (.pt or .safetensors) nor a folder')


def open_source(path: str | Path, name: str, *, method: Optional[str] = None, config: Optional[str] = None,
                overrides: Sequence[str] = (), call_kwargs: Optional[dict[str, Any]] = None, device=None,
                dtype: Optional[str] = None) -> ImageSource:
    """Open a pipeline folder or a checkpoint as an :class:`ImageSource`.

    * A pipeline folder with ``senseflow_export.json`` (written by :mod:`senseflow_algos.export`): the in-repo sampler
      (``method``, default the exported sampler) on the pipeline's modules.
    * Any other pipeline folder: the pipeline with ``call_kwargs``.
    * A checkpoint (``.pt``, a run folder, a bare ``generator.safetensors``): the model rebuilt from ``config`` and
      sampled with the in-repo sampler.

    Args:
        path: The folder or file.
        name (str): Row name.
        method (str, optional): Sampler for SenseFlow students.
        config (str, optional), overrides: Run YAML (and overrides) of a checkpoint.
        call_kwargs (dict, optional): Pipeline arguments (``num_inference_steps``, ``guidance_scale``, ...).
        device: Where to run. Default: CUDA if available, else CPU.
        dtype (str, optional): ``fp32`` / ``bf16`` / ``fp16`` for pipelines. Default: fp32 on CPU, bf16 on CUDA.

    Raises:
        EvalError: If ``path`` is neither.
    """
    from senseflow_algos.checkpointing import CheckpointError
    from senseflow_algos.export import EXPORT_INFO, load_export_info, sampling_components_from_pipeline
    from senseflow_algos.restore import restore_student

    check_source_path(path)
    uri = '://' in str(path)
    path = str(path) if uri else Path(path)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dtype is not None and dtype not in DTYPES:
        raise EvalError(f'dtype={dtype!r} is not one of {sorted(DTYPES)}')
    torch_dtype = DTYPES[dtype or ('bf16' if device.type == 'cuda' else 'fp32')]
    if not uri and _is_pipeline_folder(path):
        from diffusers import DiffusionPipeline

        info = load_export_info(path) if (path / EXPORT_INFO).is_file() else None
        load_kwargs = (info or {}).get('load_kwargs', {})  # e.g. SDXL: no invisible watermark on the samples
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype, **load_kwargs).to(device)
        if info is not None:
            parts = sampling_components_from_pipeline(pipe, info)
            return SamplerSource(name, parts, method or info['sampler'],
                                 {'kind': 'senseflow-export', 'path': str(path.resolve())})
        return PipelineSource(name, pipe, call_kwargs or {}, str(path.resolve()))
    try:
        student = restore_student(path, config, overrides)  # the generator alone, with the VAE and text encoders
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    parts = SamplingComponents.from_model(student)
    del student
    for module in (parts.net, parts.vae, parts.conditioner):
        module.to(device)
    return SamplerSource(name, parts, method or 'renoise',
                         {'kind': 'checkpoint', 'path': path if uri else str(path.resolve()), 'config': str(config)})


def _check_meta(folder: Path, meta: dict[str, Any]) -> None:
    file = folder / 'meta.json'
    if not file.is_file():
        return
    old = json.loads(file.read_text())
    differ = sorted(k for k in set(old) | set(meta) if k not in ('nfe',) and old.get(k) != meta.get(k))
    if differ:
        raise EvalError(f'{folder} holds images made with other settings ({", ".join(differ)} differ: '
                        f'{ {k: old.get(k) for k in differ} } vs { {k: meta.get(k) for k in differ} }); use another '
                        '--out folder or delete it')


def generate_images(source: ImageSource, prompts: Sequence[str], folder: str | Path, seed: int = 0,
                    batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Generate the images of ``prompts`` missing from ``folder`` (resumable).

    Args:
        source (ImageSource): The generator.
        prompts: All prompts; image ``i`` uses ``prompts[i]`` and seed ``seed + i``.
        folder: Output folder (``<i:05d>.png`` and ``meta.json``).
        seed (int): Base seed.
        batch_size (int): Images per call.
        progress (bool): Show a progress bar.

    Returns:
        dict: ``generated`` and ``skipped`` counts and ``nfe`` (per image, measured or from an earlier run).

    Raises:
        EvalError: If the folder holds images from another source or seed.
    """
    if batch_size < 1:
        raise EvalError(f'--batch-size must be >= 1, got {batch_size}')
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {'source': source.describe(), 'seed': seed}
    _check_meta(folder, meta)
    meta_file = folder / 'meta.json'
    old_nfe = json.loads(meta_file.read_text()).get('nfe') if meta_file.is_file() else None
    meta_file.write_text(json.dumps({**meta, 'nfe': old_nfe}, indent=2) + '\n')
    missing = [i for i in range(len(prompts)) if not image_path(folder, i).is_file()]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(missing), desc=f'generating {source.name}',
               disable=not progress, unit='img')
    for start in range(0, len(missing), batch_size):
        idx = missing[start:start + batch_size]
        images = source.generate([prompts[i] for i in idx], [seed + i for i in idx])
        for i, img in zip(idx, images_to_pil(images)):
            target = image_path(folder, i)
            tmp = target.with_suffix('.tmp.png')
            img.save(tmp, format='PNG')
            os.replace(tmp, target)  # never a half-written PNG that a resumed run would skip
        bar.update(len(idx))
    bar.close()
    nfe = source.nfe if source.nfe is not None else old_nfe
    meta_file.write_text(json.dumps({**meta, 'nfe': nfe}, indent=2) + '\n')
    return {'generated': len(missing), 'skipped': len(prompts) - len(missing), 'nfe': nfe}


def load_images(folder: str | Path, indices: Sequence[int]) -> torch.Tensor:
    """``(B, 3, H, W)`` float images in [0, 1] read from ``<folder>/<i:05d>.png``."""
    import numpy as np
    from PIL import Image

    arrays = []
    for i in indices:
        path = image_path(folder, i)
        if not path.is_file():
            raise EvalError(f'image {path} is missing')
        with Image.open(path) as img:
            arrays.append(np.asarray(img.convert('RGB'), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def free_memory() -> None:
    """Collect garbage and empty the CUDA cache between sources."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
