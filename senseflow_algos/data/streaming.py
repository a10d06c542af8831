"""Streaming (MDS) training datasets: image + caption, precomputed embeddings / latents, and prompt-only.

One class, :class:`SenseflowStreamingDataset`, with a ``kind``:

* ``image_caption``: ``{'image': (3, R, R) in [-1, 1], 'prompt': str}``; the model encodes both online.
* ``precomputed``: ``prompt_embeds``, ``pooled_prompt_embeds`` (and, for SD 3.5, the empty-prompt
  ``negative_*`` embeddings, stored once per dataset), ``latents`` when the data has them and ``image`` when the
  data has images and ``load_images`` is on (the VFM discriminator needs them); no text encoder or VAE encoder
  is needed to train (``model.text_encoders: false``, ``model.vae_encoder: false``). Written by
  ``data_prep/precompute.py``, which also writes :data:`PRECOMPUTE_META_FILE` at the dataset root.
* ``prompts``: ``{'prompt': str}`` only: data-free DMD (backward simulation only).

Images are decoded from the stored file bytes, resized (shorter side to the training resolution, bicubic) and
centre-cropped: :func:`image_to_tensor`, the same transform ``data_prep/precompute.py`` encodes latents from.

Bad data (:class:`BadSampleError`): a missing column or a wrong embedding shape in a shard fails when the dataset
is built, naming the stream and shard. A sample that fails to load (unreadable image, empty caption, embedding of
the wrong shape or not finite) raises, naming stream, shard and sample, or with ``bad_samples='skip'`` is replaced
by the next good sample of the dataset (deterministic, so resumption stays exact) and counted in
:attr:`SenseflowStreamingDataset.num_bad_samples` with a logged warning.

Mid-epoch resumption: Composer saves ``dataset.state_dict(samples_seen_in_epoch, True)`` in every checkpoint and
calls ``load_state_dict`` on resume, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader

from senseflow_algos.data.samples import BadSampleError, open_image
from senseflow_algos.data.uri import is_remote, join_uri, read_file
from senseflow_algos.registry import DATASETS

__all__ = [
    'KINDS', 'PRECOMPUTE_META_FILE', 'NEGATIVES_FILE', 'BadSampleError', 'SenseflowStreamingDataset',
    'build_streaming_dataloader', 'image_to_tensor', 'make_streams'
]

log = logging.getLogger(__name__)

KINDS = ('image_caption', 'precomputed', 'prompts')
#: Written by ``data_prep/precompute.py`` at the dataset root: family, resolution, column shapes.
PRECOMPUTE_META_FILE = 'senseflow_precompute.json'
#: Empty-prompt embeddings (SD 3.5's CFG branch), stored once per dataset (``.npz``).
NEGATIVES_FILE = 'negative_embeddings.npz'
EMBEDDING_KEYS = ('prompt_embeds', 'pooled_prompt_embeds')
NEGATIVE_KEYS = ('negative_prompt_embeds', 'negative_pooled_prompt_embeds')
#: Consecutive bad samples tolerated while looking for a replacement with ``bad_samples='skip'``.
MAX_CONSECUTIVE_BAD = 1000


def image_to_tensor(image, resolution: int) -> torch.Tensor:
    """PIL image -> ``(3, R, R)`` float32 in [-1, 1]: shorter side resized to ``R`` (bicubic, antialiased), then
    centre-cropped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = TF.resize(image.convert('RGB'), resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, [resolution, resolution])
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0


def _default_local(remote: str, split: Optional[str]) -> str:
    digest = hashlib.sha1(f'{remote}|{split}'.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), 'senseflow-streaming', digest)


def make_streams(streams: Optional[Sequence[dict[str, Any]]] = None, remote: Optional[str] = None,
                 local: Optional[str] = None, split: Optional[str] = None) -> list[Stream]:
    """``Stream`` objects from the YAML (``streams:`` list or a single ``remote``/``local``).

    A ``remote`` that is a local folder is read in place (no copy) unless ``local`` is given; a remote URI without
    ``local`` is cached under the system temp folder (one folder per URI).
    """
    if streams and (remote or local):
        raise ValueError('set either dataset.streams or dataset.remote / dataset.local, not both')
    specs = [dict(s) for s in streams] if streams else [{'remote': remote, 'local': local, 'split': split}]
    out = []
    for n, spec in enumerate(specs):
        rem, loc = spec.pop('remote', None), spec.pop('local', None)
        spl = spec.pop('split', None) or split
        if not rem and not loc:
            raise ValueError(f'dataset stream {n}: set remote and/or local')
        if rem and not is_remote(rem) and not loc:
            rem, loc = None, rem
        if rem and not loc:
            loc = _default_local(rem, spl)
        unknown = set(spec) - {'proportion', 'repeat', 'choose'}
        if unknown:
            raise ValueError(f'dataset stream {n}: unknown keys {sorted(unknown)}')
        out.append(Stream(remote=rem, local=loc, split=spl, **spec))
    return out


def _stream_root(stream: Stream) -> str:
    root = stream.remote if stream.remote else stream.local
    return join_uri(root, stream.split) if stream.split else root


def _ndarray_shape(encoding: str) -> Optional[tuple[str, tuple[int, ...]]]:
    """``'ndarray:float16:4,16,16'`` -> ``('float16', (4, 16, 16))``; ``None`` for an untyped encoding."""
    parts = encoding.split(':')
    if parts[0] != 'ndarray' or len(parts) != 3:
        return None
    return parts[1], tuple(int(d) for d in parts[2].split(','))


class SenseflowStreamingDataset(StreamingDataset):
    """A :class:`StreamingDataset` yielding training samples of one :data:`KINDS` (see the module docstring).

    Args:
        kind (str): ``image_caption``, ``precomputed`` or ``prompts``.
        resolution (int): Training image side (images are resized and centre-cropped to it; precomputed latents
            must have been made at it).
        streams (Sequence[Stream]): The streams (see :func:`make_streams`).
        batch_size (int): Per-device batch size (Streaming partitions by it).
        bad_samples (str): ``error`` (default) or ``skip`` (replace by the next good sample, count, warn).
        load_images (bool): ``precomputed``: also return the decoded ``image`` when the data has one (needed by
            the VFM discriminator). Default: ``True``.
        caption_column (str): Caption column. Default: ``caption``.
        image_column (str): Image column (raw file bytes, or a PIL image from a ``jpeg``/``png``/``pil`` column).
            Default: ``image``.
        **kwargs: Further :class:`StreamingDataset` arguments (``shuffle``, ``shuffle_seed``,
            ``num_canonical_nodes``, ``cache_limit``, ``predownload``, ``epoch_size``, ...).
    """

    def __init__(self, *, kind: str, resolution: int, streams: Sequence[Stream], batch_size: int,
                 bad_samples: str = 'error', load_images: bool = True, caption_column: str = 'caption',
                 image_column: str = 'image', **kwargs):
        if kind not in KINDS:
            raise ValueError(f'dataset.kind={kind!r} is not one of {KINDS}')
        if bad_samples not in ('error', 'skip'):
            raise ValueError(f"dataset.bad_samples must be 'error' or 'skip', got {bad_samples!r}")
        super().__init__(streams=list(streams), batch_size=batch_size, **kwargs)
        self.kind, self.resolution, self.bad_samples = kind, resolution, bad_samples
        self.caption_column, self.image_column = caption_column, image_column
        #: Bad samples replaced so far (in this process / dataloader worker).
        self.num_bad_samples = 0
        self.meta: Optional[dict[str, Any]] = None
        self.negatives: dict[str, torch.Tensor] = {}
        self.array_columns: dict[str, tuple[int, ...]] = {}
        if kind == 'precomputed':
            self._load_precompute_meta()
            required = list(EMBEDDING_KEYS)
            optional = ['latents', caption_column] + ([image_column] if load_images else [])
        elif kind == 'image_caption':
            required, optional = [image_column, caption_column], []
        else:
            required, optional = [caption_column], []
        self._require(required)
        present = self._columns_in_every_shard(optional)
        self.columns = required + [c for c in optional if c in present]
        if kind == 'precomputed':
            self._check_array_columns()

    # -- checks at build time ----------------------------------------------------------------------------------------

    def _shard_where(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        shard = self.shards[shard_id]
        return f'stream {_stream_root(stream)!r}, shard {shard.raw_data.basename}'

    def _columns_in_every_shard(self, used: Sequence[str]) -> set[str]:
        """Columns every shard has; a ``used`` column that some shards have and others lack is an error."""
        sets = [set(shard.column_names) for shard in self.shards]
        common = set.intersection(*sets)
        for col in [c for c in used if c not in common and any(c in s for s in sets)]:
            has = next(i for i, s in enumerate(sets) if col in s)
            lacks = next(i for i, s in enumerate(sets) if col not in s)
            raise BadSampleError(f'{self._shard_where(lacks)} has no column {col!r} that {self._shard_where(has)} '
                                 'has: the streams mix datasets of different kinds (e.g. with and without latents)')
        return common

    def _require(self, columns: Sequence[str]) -> None:
        for shard_id, shard in enumerate(self.shards):
            missing = [c for c in columns if c not in shard.column_names]
            if missing:
                hint = ''
                if self.kind == 'precomputed' and any(c in EMBEDDING_KEYS for c in missing):
                    hint = ' (run data_prep/precompute.py on it, or use dataset.kind=image_caption)'
                raise BadSampleError(f'{self._shard_where(shard_id)} has no column {missing} needed by '
                                     f'dataset.kind={self.kind} (columns: {sorted(shard.column_names)}){hint}')

    def _load_precompute_meta(self) -> None:
        metas, negatives = [], []
        for stream in self.streams:
            root = _stream_root(stream)
            raw = read_file(join_uri(root, PRECOMPUTE_META_FILE))
            if raw is None:
                raise BadSampleError(f'stream {root!r} has no {PRECOMPUTE_META_FILE}: dataset.kind=precomputed reads '
                                     'data written by data_prep/precompute.py')
            meta = json.loads(raw)
            neg = {}
            if meta.get('negatives'):
                data = read_file(join_uri(root, meta['negatives']))
                if data is None:
                    raise BadSampleError(f'stream {root!r}: {meta["negatives"]} (empty-prompt embeddings) is missing')
                with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                    neg = {k: npz[k] for k in NEGATIVE_KEYS}
            metas.append((root, meta))
            negatives.append(neg)
        root0, meta0 = metas[0]
        for root, meta in metas[1:]:
            for key in ('family', 'columns', 'resolution'):
                if meta.get(key) != meta0.get(key):
                    raise BadSampleError(f'streams {root0!r} and {root!r} were precomputed differently ({key}: '
                                         f'{meta0.get(key)} vs {meta.get(key)}); precompute them with the same '
                                         'teacher and resolution')
        for (root, _), neg in zip(metas[1:], negatives[1:]):
            if neg.keys() != negatives[0].keys() or any(not np.array_equal(neg[k], negatives[0][k]) for k in neg):
                raise BadSampleError(f'streams {root0!r} and {root!r} have different empty-prompt embeddings: they '
                                     'were precomputed with different text encoders')
        if meta0.get('latents') and meta0.get('resolution') != self.resolution:
            raise BadSampleError(f'stream {root0!r}: latents were precomputed at resolution {meta0.get("resolution")}'
                                 f' but the model trains at {self.resolution}; precompute again with '
                                 f'--resolution {self.resolution} or set model.resolution')
        self.meta = meta0
        self.negatives = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in negatives[0].items()}

    def _check_array_columns(self) -> None:
        """Each precomputed array column has the shape the precompute metadata (family) says, in every shard."""
        assert self.meta is not None
        expected = {k: _ndarray_shape(v) for k, v in self.meta['columns'].items()}
        for name in [c for c in self.columns if c in expected]:
            self.array_columns[name] = expected[name][1]
            for shard_id, shard in enumerate(self.shards):
                enc = shard.column_encodings[shard.column_names.index(name)]
                typed = _ndarray_shape(enc)
                if enc == 'ndarray':
                    continue  # untyped: the shape is checked per sample
                if typed is None or typed[1] != expected[name][1]:
                    raise BadSampleError(
                        f'{self._shard_where(shard_id)}: column {name!r} is {enc!r} but the dataset was precomputed '
                        f'for family {self.meta.get("family")!r} with {self.meta["columns"][name]!r}: wrong '
                        'embedding shape for the family (shards of different teachers mixed?)')

    # -- samples -----------------------------------------------------------------------------------------------------

    def _where(self, index: int) -> str:
        shard_id, shard_sample = self.spanner[index]
        return f'{self._shard_where(shard_id)}, sample {shard_sample} of the shard (dataset index {index})'

    def _convert(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.caption_column in self.columns:
            caption = sample[self.caption_column]
            if not isinstance(caption, str) or not caption.strip():
                raise BadSampleError(f'empty caption in column {self.caption_column!r}')
            out['prompt'] = caption
        if self.image_column in self.columns:
            out['image'] = image_to_tensor(open_image(sample[self.image_column]), self.resolution)
        for name, shape in self.array_columns.items():
            array = np.asarray(sample[name])
            if tuple(array.shape) != shape:
                raise BadSampleError(f'{name} has shape {tuple(array.shape)}, expected {shape} for family '
                                     f'{self.meta.get("family")!r}')
            array = array.astype(np.float32)
            if not np.isfinite(array).all():
                raise BadSampleError(f'{name} has non-finite values')
            out[name] = torch.from_numpy(array)
        out.update(self.negatives)
        return out

    def __getitem__(self, index: Any) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            return super().__getitem__(index)
        index = int(index)
        for attempt in range(MAX_CONSECUTIVE_BAD):
            at = (index + attempt) % self.num_samples
            sample = super().__getitem__(at)
            try:
                return self._convert(sample)
            except BadSampleError as e:
                where = self._where(at)
                key = sample.get('key')
                where += f', key {key!r}' if isinstance(key, str) else ''
                if self.bad_samples == 'error':
                    raise BadSampleError(f'{where}: {e} (dataset.bad_samples=skip replaces such samples)') from None
                self.num_bad_samples += 1
                log.warning('bad sample replaced by the next one: %s: %s [%d so far]', where, e, self.num_bad_samples)
        raise BadSampleError(f'{MAX_CONSECUTIVE_BAD} consecutive bad samples from {self._where(index)} on')


def build_streaming_dataloader(kind: str, batch_size: int, resolution: int, seed: int = 0,
                               streams: Optional[Sequence[dict[str, Any]]] = None, remote: Optional[str] = None,
                               local: Optional[str] = None, split: Optional[str] = None, shuffle: bool = True,
                               shuffle_seed: Optional[int] = None, num_workers: int = 0, bad_samples: str = 'error',
                               load_images: bool = True, caption_column: str = 'caption',
                               image_column: str = 'image', streaming_kwargs: Optional[dict[str, Any]] = None,
                               dataloader_kwargs: Optional[dict[str, Any]] = None,
                               num_samples: Optional[int] = None) -> DataLoader:
    """A ``DataLoader`` over a :class:`SenseflowStreamingDataset` with the per-device ``batch_size``.

    Composer finds the dataset's ``state_dict`` / ``load_state_dict`` through ``dataloader.dataset`` and resumes
    mid-epoch from it. ``shuffle_seed`` defaults to the run seed. ``num_samples`` (the synthetic kinds' size) must be
    unset: a streaming kind reads the whole dataset.
    """
    if num_samples is not None:
        raise ValueError(f'dataset.num_samples is for the synthetic kinds; dataset.kind={kind} streams the whole '
                         'dataset: set dataset.num_samples=null (use dataset.streaming_kwargs.epoch_size to '
                         'resize an epoch)')
    dataset = SenseflowStreamingDataset(
        kind=kind, resolution=resolution, streams=make_streams(streams, remote, local, split), batch_size=batch_size,
        bad_samples=bad_samples, load_images=load_images, caption_column=caption_column, image_column=image_column,
        shuffle=shuffle, shuffle_seed=seed if shuffle_seed is None else shuffle_seed, **(streaming_kwargs or {}))
    kwargs = dict(dataloader_kwargs or {})
    if num_workers == 0:
        for key in ('persistent_workers', 'prefetch_factor'):
            kwargs.pop(key, None)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True, **kwargs)


# ``dataset.kind: <kind>`` for each streaming kind: the other ``dataset:`` keys are build_streaming_dataloader's.
for _kind in KINDS:
    DATASETS.register(_kind, functools.partial(build_streaming_dataloader, _kind))
