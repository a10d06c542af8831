"""Writing MDS (MosaicML Streaming) datasets: captioned images, prompt lists, and the part-wise writer shared by the
``data_prep/`` scripts.

Everything ``data_prep/`` does goes through :func:`write_parts`: the inputs are a fixed, ordered list of records
cut into *parts* of ``part_size`` records; each part is written by its own ``MDSWriter`` into ``<out>/part-NNNNN/``
and is done once its ``index.json`` exists. A rerun skips the done parts (resume), ranks of a ``composer -n N``
launch take parts round-robin, and at the end rank 0 merges the parts' indexes into ``<out>/index.json`` with
``streaming.base.util.merge_index``. ``<out>`` is a local folder or any remote URI Streaming writes to
(``s3://``, ``gs://``, ``oci://``, ``azure://``, ...).

Columns written by the converters (:data:`IMAGE_COLUMNS`, :data:`PROMPT_COLUMNS`): ``image`` holds the image file's
bytes exactly as read (lossless; decoded at training time), ``caption``, ``width`` and ``height`` (after EXIF
orientation, as training sees it), and ``key`` (the source: relative path, manifest row or prompt line).

The scripts beside this file import it as ``mds_writer``: Python puts a script's folder first on ``sys.path``
(``python data_prep/<script>.py``, ``composer -n N data_prep/<script>.py``); a loader that runs a script in-process
(the data tests, ``bench/data_precompute.py``) puts ``data_prep/`` on ``sys.path`` first. Files at a URI and image
decoding, which training shares, live in :mod:`senseflow_algos.data.uri` and :mod:`senseflow_algos.data.samples`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from senseflow_algos.data.samples import BadSampleError, open_image
from senseflow_algos.data.uri import file_exists, is_remote, join_uri, read_file, write_file

__all__ = [
    'IMAGE_COLUMNS', 'PROMPT_COLUMNS', 'IMAGE_EXTENSIONS', 'PREP_STATE_FILE', 'Record', 'PartStats', 'rank_world',
    'barrier', 'folder_records', 'manifest_records', 'prompt_file_records', 'read_manifest', 'image_sample',
    'prompt_sample', 'write_parts', 'part_name', 'simple_make_samples', 'count_samples', 'add_writer_args',
    'run_writer'
]

log = logging.getLogger(__name__)

#: Columns of an image + caption MDS dataset.
IMAGE_COLUMNS = {'image': 'bytes', 'caption': 'str', 'width': 'int32', 'height': 'int32', 'key': 'str'}
#: Columns of a prompt-only MDS dataset.
PROMPT_COLUMNS = {'caption': 'str', 'key': 'str'}
#: File suffixes taken as images when walking a folder (case-insensitive).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
#: Written at the output root: what the parts were made from, so a resume with other inputs is refused.
PREP_STATE_FILE = 'senseflow_prep.json'
INDEX_FILE = 'index.json'


@dataclass(frozen=True)
class Record:
    """One input of a converter: where it came from, its image file (``None`` for prompts) and its caption."""
    key: str
    caption: Optional[str]
    image_path: Optional[str] = None


@dataclass
class PartStats:
    """What :func:`write_parts` did on this rank."""
    parts_total: int
    parts_written: int = 0
    parts_skipped: int = 0
    samples_written: int = 0
    bad_samples: int = 0


# -- ranks ------------------------------------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` from the environment the ``composer`` launcher sets (``(0, 1)`` otherwise)."""
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def barrier(timeout_s: float = 7 * 24 * 3600) -> None:
    """Wait for every rank (a no-op with one rank). Initialises a gloo process group on first use.

    The timeout is long on purpose: ranks finish their parts at different times.
    """
    _, world = rank_world()
    if world == 1:
        return
    import datetime

    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group('gloo', timeout=datetime.timedelta(seconds=timeout_s))
    tdist.barrier()


# -- inputs -----------------------------------------------------------------------------------------------------------


def folder_records(folder: str | os.PathLike, recursive: bool = True,
                   extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Record]:
    """Images in ``folder`` (sorted by relative path) with their same-named ``.txt`` caption files.

    An image without a caption file becomes a record with ``caption=None`` (a bad sample when written).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f'input folder not found: {root}')
    exts = {e.lower() for e in extensions}
    files = root.rglob('*') if recursive else root.glob('*')
    images = sorted(p for p in files if p.is_file() and p.suffix.lower() in exts)
    records = []
    for path in images:
        txt = path.with_suffix('.txt')
        caption = txt.read_text(encoding='utf-8') if txt.is_file() else None
        records.append(Record(key=path.relative_to(root).as_posix(), caption=caption, image_path=str(path)))
    return records


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL (``.jsonl``/``.json`` lines), CSV/TSV or Parquet manifest, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'manifest not found: {path}')
    suffix = path.suffix.lower()
    if suffix in ('.jsonl', '.ndjson', '.json'):
        rows = []
        with path.open(encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f'{path}, line {n}: not a JSON object ({e})') from None
        return rows
    if suffix in ('.csv', '.tsv'):
        with path.open(encoding='utf-8', newline='') as f:
            return list(csv.DictReader(f, delimiter='\t' if suffix == '.tsv' else ','))
    if suffix in ('.parquet', '.pq'):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            try:
                import pandas as pd
            except ImportError:
                raise ImportError(f'{path}: reading Parquet needs pyarrow (or pandas with a Parquet engine), which '
                                  'is not installed: `pip install pyarrow`, or convert the manifest to JSONL or '
                                  'CSV.') from None
            return pd.read_parquet(path).to_dict('records')
        return pq.read_table(path).to_pylist()
    raise ValueError(f'{path}: unknown manifest format {suffix!r}; use .jsonl, .csv, .tsv or .parquet')


def manifest_records(path: str | os.PathLike, caption_column: str = 'caption', image_column: Optional[str] = 'image',
                     image_root: Optional[str] = None) -> list[Record]:
    """Records from a manifest: one per row, in file order.

    Args:
        path: The manifest (see :func:`read_manifest`).
        caption_column: Column with the caption / prompt.
        image_column: Column with the image path; ``None`` for prompt-only records.
        image_root: Folder relative image paths are resolved against. Default: the manifest's folder.
    """
    rows = read_manifest(path)
    root = Path(image_root) if image_root else Path(path).parent
    needed = [c for c in (caption_column, image_column) if c]
    records = []
    for n, row in enumerate(rows):
        missing = [c for c in needed if c not in row]
        if missing:
            raise KeyError(f'{path}, row {n}: no column {missing} (columns: {sorted(row)}); choose the columns '
                           'with --caption-column / --image-column')
        caption = row[caption_column]
        caption = None if caption is None or (isinstance(caption, float) and caption != caption) else str(caption)
        image = None
        if image_column:
            image = str(row[image_column])
            image = image if os.path.isabs(image) else str(root / image)
        records.append(Record(key=f'{Path(path).name}:{n}', caption=caption, image_path=image))
    return records


def prompt_file_records(path: str | os.PathLike) -> list[Record]:
    """One record per line of a text file (line numbers from 1 in the key). Blank lines are empty prompts."""
    text = Path(path).read_text(encoding='utf-8')
    return [Record(key=f'{Path(path).name}:{n}', caption=line) for n, line in enumerate(text.splitlines(), 1)]


# -- samples ----------------------------------------------------------------------------------------------------------


def _caption(record: Record) -> str:
    if record.caption is None:
        raise BadSampleError('no caption (missing .txt file or empty manifest cell)')
    caption = record.caption.strip()
    if not caption:
        raise BadSampleError('empty caption')
    return caption


def image_sample(record: Record) -> dict[str, Any]:
    """Record -> an :data:`IMAGE_COLUMNS` sample: the file's bytes as read, size, stripped caption."""
    caption = _caption(record)
    try:
        data = Path(record.image_path).read_bytes()
    except OSError as e:
        raise BadSampleError(f'cannot read image file {record.image_path} ({e})') from None
    width, height = open_image(data).size
    return {'image': data, 'caption': caption, 'width': width, 'height': height, 'key': record.key}


def prompt_sample(record: Record) -> dict[str, Any]:
    """Record -> a :data:`PROMPT_COLUMNS` sample."""
    return {'caption': _caption(record), 'key': record.key}


# -- the part-wise writer ---------------------------------------------------------------------------------------------


def part_name(i: int) -> str:
    return f'part-{i:05d}'


def _fingerprint(records: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(repr(r).encode())
        h.update(b'\0')
    return h.hexdigest()


def _check_prep_state(out: str, state: dict[str, Any], overwrite: bool, rank: int) -> None:
    """Refuse to resume into an output made from other inputs or settings; with ``overwrite``, start afresh."""
    path = join_uri(out, PREP_STATE_FILE)
    old = read_file(path)
    if old is not None and json.loads(old) != state and not overwrite:
        old_state = json.loads(old)
        diff = sorted(k for k in set(state) | set(old_state) if state.get(k) != old_state.get(k))
        raise FileExistsError(f'{out} holds a dataset made from other inputs or settings (differs in {diff}); '
                              'pass --overwrite to replace it or choose another output')
    if overwrite and rank == 0 and not is_remote(out) and os.path.isdir(out):
        shutil.rmtree(out)
    barrier()
    if rank == 0 and (old is None or overwrite or json.loads(old) != state):
        write_file(out, PREP_STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
    barrier()


def write_parts(records: Sequence[Any], out: str, columns: dict[str, str],
                make_samples: Callable[[Sequence[Any], Sequence[int]], Iterable[tuple[int, Any]]], *,
                part_size: int = 10000, state: Optional[dict[str, Any]] = None, on_bad: str = 'error',
                compression: Optional[str] = None, size_limit: str | int = '256mb', overwrite: bool = False,
                progress: bool = True, desc: str = 'samples', after_merge: Optional[Callable[[], None]] = None
                ) -> PartStats:
    """Write ``records`` as MDS parts under ``out`` (resumable, rank-parallel) and merge their indexes.

    Args:
        records: The ordered inputs. Record ``i`` goes to part ``i // part_size``.
        out: Output folder or remote URI.
        columns: MDS columns (name -> encoding).
        make_samples: ``make_samples(records_chunk, indices) -> iterable of (index, sample_or_BadSampleError)``: turns a
            chunk of records into samples (a :class:`BadSampleError` instance for a record that cannot be used).
        part_size: Records per part (the unit of resumption and of work per rank). Default: ``10000``.
        state: JSON-able description of the inputs and settings; stored at the root and compared on resume.
        on_bad: ``error``: stop at the first bad record, naming it; ``skip``: leave it out, log it, count it.
        compression: MDS shard compression (``zstd``, ...). Default: none (images are already compressed).
        size_limit: Shard size limit. Default: ``256mb``.
        overwrite: Delete a previous output instead of resuming it.
        progress: Show a tqdm bar.
        desc: Progress bar label.
        after_merge: Called on rank 0 after the merged index is written (e.g. to write metadata).
    """
    from streaming import MDSWriter
    from streaming.base.util import merge_index

    if on_bad not in ('error', 'skip'):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if part_size < 1:
        raise ValueError(f'part_size must be >= 1, got {part_size}')
    if not records:
        raise ValueError('no input records: nothing to write')
    rank, world = rank_world()
    num_parts = (len(records) + part_size - 1) // part_size
    full_state = dict(state or {}, num_records=len(records), part_size=part_size, columns=columns,
                      fingerprint=_fingerprint(records))
    _check_prep_state(out, full_state, overwrite, rank)
    stats = PartStats(parts_total=num_parts)
    mine = list(range(rank, num_parts, world))
    # With --overwrite a remote output cannot be deleted up front: rewrite every part instead of skipping it.
    done = [] if overwrite else [i for i in mine if file_exists(join_uri(out, part_name(i), INDEX_FILE))]
    todo = [i for i in mine if i not in done]
    stats.parts_skipped = len(done)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(min(part_size, len(records) - i * part_size) for i in mine)
        initial = sum(min(part_size, len(records) - i * part_size) for i in done)
        bar = tqdm(total=total, initial=initial, desc=f'{desc} (rank {rank})' if world > 1 else desc,
                   unit='sample', dynamic_ncols=True)
    for i in todo:
        lo, hi = i * part_size, min((i + 1) * part_size, len(records))
        part_out = join_uri(out, part_name(i))
        written = 0
        with MDSWriter(out=part_out, columns=columns, compression=compression, size_limit=size_limit,
                       exist_ok=True) as writer:
            for index, sample in make_samples(records[lo:hi], range(lo, hi)):
                if isinstance(sample, BadSampleError):
                    where = f'record {index} ({_describe(records[index])})'
                    if on_bad == 'error':
                        raise BadSampleError(f'{where}: {sample} (pass --on-bad skip to leave such records out)')
                    stats.bad_samples += 1
                    log.warning('skipped %s: %s [%d skipped so far]', where, sample, stats.bad_samples)
                else:
                    writer.write(sample)
                    written += 1
                if bar is not None:
                    bar.update(1)
        if written == 0:
            raise BadSampleError(f'part {i} (records {lo}..{hi - 1}) has no usable record left; an MDS part cannot '
                                 'be empty. Fix the inputs.')
        stats.parts_written += 1
        stats.samples_written += written
    if bar is not None:
        bar.close()
    barrier()
    if rank == 0:
        indexes = [join_uri(out, part_name(i), INDEX_FILE) for i in range(num_parts)]
        missing = [p for p in indexes if not file_exists(p)]
        if missing:
            raise RuntimeError(f'parts not finished: {missing[:5]}{"..." if len(missing) > 5 else ""}')
        if is_remote(out):
            merge_index(indexes, out, keep_local=False)
        else:
            # merge_index refuses to replace an index.json (a resumed run merges again).
            if os.path.exists(os.path.join(out, INDEX_FILE)):
                os.remove(os.path.join(out, INDEX_FILE))
            merge_index(indexes, out)
        if after_merge is not None:
            after_merge()
    barrier()
    return stats


def _describe(record: Any) -> str:
    if isinstance(record, Record):
        return f'key {record.key!r}' + (f', image {record.image_path}' if record.image_path else '')
    return repr(record)


def simple_make_samples(fn: Callable[[Any], dict[str, Any]]):
    """Adapt a per-record ``fn(record) -> sample`` (raising :class:`BadSampleError`) to :func:`write_parts`."""

    def make(chunk, indices):
        for record, index in zip(chunk, indices):
            try:
                yield index, fn(record)
            except BadSampleError as e:
                yield index, e

    return make


def count_samples(root: str) -> int:
    """Samples listed in the merged ``index.json`` at ``root`` (local or remote)."""
    data = read_file(join_uri(root, INDEX_FILE))
    if data is None:
        raise FileNotFoundError(f'no {INDEX_FILE} at {root}')
    return sum(int(s['samples']) for s in json.loads(data)['shards'])


# -- command-line plumbing shared by data_prep/ -----------------------------------------------------------------------


def add_writer_args(parser) -> None:
    """The output flags every ``data_prep/`` converter takes."""
    parser.add_argument('--out', required=True,
                        help='Output dataset: a local folder or a URI Streaming can write to (s3://bucket/path, '
                        'gs://..., oci://..., azure://..., dbfs:/...). Parts go to <out>/part-NNNNN/, the merged index '
                        'to <out>/index.json.')
    parser.add_argument('--part-size', type=int, default=10000,
                        help='Records per part (default: %(default)s). A part is the unit of resumption and of work '
                        'per rank: a rerun skips parts that are complete.')
    parser.add_argument('--on-bad', choices=('error', 'skip'), default='error',
                        help='What to do with a bad record (unreadable image, missing or empty caption): stop with an '
                        'error naming it (default), or skip it with a logged warning and count it.')
    parser.add_argument('--compression', default=None,
                        help='Shard compression, e.g. zstd or zstd:7 (default: none; image bytes are already '
                        'compressed).')
    parser.add_argument('--size-limit', default='256mb', help='Maximum shard size (default: %(default)s).')
    parser.add_argument('--overwrite', action='store_true',
                        help='Replace an existing output instead of resuming it. Without it, an output written from '
                        'other inputs or settings is refused.')
    parser.add_argument('--no-progress', action='store_true', help='No progress bar.')


def run_writer(args, records: Sequence[Any], columns: dict[str, str], make_samples, state: dict[str, Any],
               desc: str, after_merge: Optional[Callable[[], None]] = None) -> PartStats:
    """Call :func:`write_parts` with the flags of :func:`add_writer_args` and print a summary on rank 0."""
    stats = write_parts(records, args.out, columns, make_samples, part_size=args.part_size, state=state,
                        on_bad=args.on_bad, compression=args.compression, size_limit=args.size_limit,
                        overwrite=args.overwrite, progress=not args.no_progress, desc=desc, after_merge=after_merge)
    rank, _ = rank_world()
    if rank == 0:
        print(f'{args.out}: {count_samples(args.out)} samples in {stats.parts_total} parts '
              f'(this run, rank 0: {stats.parts_written} parts written, {stats.parts_skipped} already done, '
              f'{stats.bad_samples} bad records skipped)')
    return stats
