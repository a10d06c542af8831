"""Checkpoint files that are complete, and bad ones named.

Atomic writes: Composer 0.32.1 writes a checkpoint straight to its final name and then re-points
``latest-rank{rank}.pt``. A process killed mid-write leaves a truncated file under a real checkpoint name. Here the file
is written to a temporary name in the same folder and renamed into place (atomic on POSIX), so a checkpoint file that
exists is complete, and ``latest`` only ever points at complete files. Sharded (FSDP) checkpoints go through
torch.distributed.checkpoint, which writes its own metadata file last.

Bad checkpoints: :func:`check_checkpoint` reads the structure of a checkpoint (the zip directory and the pickle of a
``.pt`` file, the ``.metadata`` and the shard sizes of a sharded folder, the header of a ``.safetensors``) without
reading the weights, and raises :class:`CheckpointError` naming the file and what is wrong with it. It runs before
``trainer.load_path`` is loaded and before an export. :func:`skip_unreadable_latest` makes ``trainer.autoresume``
survive an unreadable newest checkpoint (a disk fault, a copy cut short): it moves it aside and re-points ``latest`` at
the newest readable one, saying which it skipped.

Renamed keys: unsharded checkpoints written before a model key was renamed load as they are (the model renames the
key as it loads, see :data:`senseflow_algos.models.dmd.LEGACY_KEYS`); a sharded one is migrated once, in place, by
:func:`migrate_sharded_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import composer.utils.checkpoint as composer_checkpoint

__all__ = [
    'CheckpointError', 'SHARDED_METADATA', 'UNREADABLE_SUFFIX', 'install_atomic_checkpoint_writes', 'checkpoint_kind',
    'check_checkpoint', 'load_composer_file', 'checkpoint_batch', 'skip_unreadable_latest', 'check_before_load',
    'migrate_sharded_checkpoint'
]

#: The metadata file torch.distributed.checkpoint writes (last) into a sharded checkpoint folder.
SHARDED_METADATA = '.metadata'
#: Appended to the name of an unreadable checkpoint that autoresume moved aside.
UNREADABLE_SUFFIX = '.unreadable'

_original_write = composer_checkpoint._write_checkpoint_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what is wrong with it."""


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes


def _atomic_write_checkpoint_file(state_dict: dict[str, Any], filename: str) -> None:
    folder, name = os.path.split(os.path.abspath(filename))
    # The temporary name ends with the real name, so Composer's writer picks the same format (.pt, .tar, .pt.lz4).
    fd, tmp = tempfile.mkstemp(prefix='.partial-', suffix=f'-{name}', dir=folder)
    os.close(fd)
    try:
        _original_write(state_dict, tmp)
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def install_atomic_checkpoint_writes() -> None:
    """Make Composer write checkpoint files atomically (idempotent)."""
    composer_checkpoint._write_checkpoint_file = _atomic_write_checkpoint_file


# ---------------------------------------------------------------------------------------------------------------------
# Checking a checkpoint


def checkpoint_kind(path: str | Path) -> str:
    """``'sharded'`` (a torch.distributed.checkpoint folder), ``'safetensors'`` or ``'pt'`` (a Composer file).

    Raises:
        CheckpointError: If ``path`` does not exist, or is a folder that is no sharded checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        if (path / SHARDED_METADATA).is_file():
            return 'sharded'
        shards = sorted(p.name for p in path.glob('*.distcp'))
        if shards:
            raise CheckpointError(f'sharded checkpoint {path} has no {SHARDED_METADATA} file (its shards {shards[:4]} '
                                  'are there): the write or the copy did not finish')
        raise CheckpointError(f'{path} is a folder but not a sharded checkpoint (no {SHARDED_METADATA})')
    if not path.exists():
        raise CheckpointError(f'checkpoint {path} does not exist' +
                              (' (a link to a missing file)' if os.path.islink(path) else ''))
    return 'safetensors' if path.suffix == '.safetensors' else 'pt'


def _check_sharded(path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata gets the same message
        raise CheckpointError(f'{path / SHARDED_METADATA} cannot be read ({type(e).__name__}: {e}): the sharded '
                              'checkpoint is incomplete or corrupt') from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f'shard {shard} of the sharded checkpoint {path} is missing (its {SHARDED_METADATA} '
                                  'lists it)')
        size = shard.stat().st_size
        if size < end:
            raise CheckpointError(f'shard {shard} is truncated: {size} bytes, but {SHARDED_METADATA} places data up to '
                                  f'byte {end}')


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            f.keys()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f'{path} is not a readable .safetensors file ({type(e).__name__}: {e})') from None


def _check_zip(path: Path) -> None:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes)')
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as f:
            head = f.read(4)
        if head[:2] == b'PK':
            raise CheckpointError(f'checkpoint {path} is truncated: it starts as a torch.save zip archive but has no '
                                  f'end-of-archive record ({size} bytes); the write or the copy did not finish')
        raise CheckpointError(f'{path} is not a checkpoint: not a torch.save zip archive (starts with {head!r}, '
                              f'{size} bytes)')
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f'checkpoint {path} is corrupt: its zip directory cannot be read ({e})') from None
    if not any(i.filename.endswith('/data.pkl') or i.filename == 'data.pkl' for i in infos):
        raise CheckpointError(f'{path} is a zip archive but not a torch.save file (no data.pkl among '
                              f'{[i.filename for i in infos[:4]]})')
    past = [i.filename for i in infos if i.header_offset + i.compress_size > size]
    if past:
        raise CheckpointError(f'checkpoint {path} is corrupt: zip entries {past[:3]} lie past its end ({size} bytes)')


def check_checkpoint(path: str | Path, load: bool = True) -> str:
    """Check that ``path`` is a readable checkpoint, without reading its weights; returns its kind.

    ``.pt``: the zip directory is complete, holds a pickle, and (``load``) the pickle loads (memory-mapped) into a
    Composer checkpoint with ``state.model``. Sharded folder: ``.metadata`` loads and every shard it lists is there and
    long enough. ``.safetensors``: the header loads. Compressed Composer files (``.pt.lz4``, ``.tar``...) are not
    opened.

    Args:
        path: The checkpoint file or sharded folder.
        load (bool): Unpickle a ``.pt`` file (memory-mapped: reads the pickle, not the tensors). Default: ``True``.

    Raises:
        CheckpointError: Naming the file and what is wrong (missing, empty, truncated, not a checkpoint...).
    """
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == 'sharded':
        _check_sharded(path)
    elif kind == 'safetensors':
        _check_safetensors(path)
    elif not re.search(r'\.(tar|tar\.gz|tgz|lz4|zst|zstd|gz|bz2|lzma|xz)$', path.name):
        _check_zip(path)
        if load:
            load_composer_file(path)
    return kind


def load_composer_file(path: str | Path) -> dict[str, Any]:
    """A Composer ``.pt`` checkpoint loaded memory-mapped on the CPU (tensors read on access).

    Raises:
        CheckpointError: If it does not unpickle or holds no ``state.model``.
    """
    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise CheckpointError(f'checkpoint {path} cannot be loaded ({type(e).__name__}: {first}): it is corrupt or '
                              'not written by torch.save') from None
    state = ckpt.get('state') if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get('model'), dict):
        tops = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f'{path} is not a Composer checkpoint (no state.model); top-level keys: {tops}')
    return ckpt


# ---------------------------------------------------------------------------------------------------------------------
# Autoresume past an unreadable checkpoint


def checkpoint_batch(name: str) -> int:
    """The batch number in a Composer checkpoint name (``ep0-ba12-rank0.pt``, ``ep0-ba12``); -1 if none."""
    m = re.search(r'ba(\d+)', name)
    return int(m.group(1)) if m else -1


def _candidates(folder: Path, sharded: bool) -> list[Path]:
    out = []
    for p in folder.iterdir():
        if p.is_symlink() or p.name.startswith(('.', 'latest')) or p.name.endswith(UNREADABLE_SUFFIX):
            continue
        if sharded and p.is_dir() and ((p / SHARDED_METADATA).exists() or any(p.glob('*.distcp'))):
            out.append(p)
        elif not sharded and p.is_file() and re.search(r'-rank0\.pt$', p.name):
            out.append(p)
    return sorted(out, key=lambda p: (checkpoint_batch(p.name), p.stat().st_mtime), reverse=True)


def skip_unreadable_latest(folder: str | Path, latest_name: str = 'latest-rank0.pt',
                           say: Callable[[str], None] = print) -> Optional[Path]:
    """Before an autoresume: if ``folder/latest_name`` points at an unreadable checkpoint, resume from the newest
    readable one instead.

    Each unreadable checkpoint newer than that one is renamed ``<name>.unreadable`` (kept for inspection, and out of
    the way of the checkpoint the resumed run writes under that name), ``latest`` is re-pointed atomically, and ``say``
    gets one line per skipped checkpoint. Call it on global rank 0 only, before the Trainer is built.

    Args:
        folder: The local save folder.
        latest_name (str): Composer's ``save_latest_filename`` for rank 0.
        say: Where the lines go. Default: ``print``.

    Returns:
        The checkpoint ``latest`` now points at, or ``None`` if there is no ``latest`` (a fresh run).

    Raises:
        CheckpointError: If no checkpoint in the folder is readable.
    """
    folder = Path(folder)
    latest = folder / latest_name
    if not os.path.lexists(latest):
        return None
    target = folder / os.readlink(latest) if latest.is_symlink() else latest
    try:
        check_checkpoint(target)
        return target
    except CheckpointError as e:
        first_error = e
    sharded = target.is_dir() or not target.suffix
    skipped = [(target, first_error)] if target.exists() else []
    for candidate in _candidates(folder, sharded):
        if candidate == target:
            continue
        try:
            check_checkpoint(candidate)
        except CheckpointError as e:
            skipped.append((candidate, e))
            continue
        if not target.exists():
            say(f'autoresume: skipping {latest}: {first_error}')
        for bad, error in skipped:
            if checkpoint_batch(bad.name) >= checkpoint_batch(candidate.name):
                aside = bad.with_name(bad.name + UNREADABLE_SUFFIX)
                os.replace(bad, aside)  # out of the way of the checkpoint the resumed run writes under that name
                say(f'autoresume: skipping unreadable checkpoint {bad}: {error} (moved to {aside.name})')
            else:
                say(f'autoresume: skipping unreadable checkpoint {bad}: {error}')
        tmp = folder / f'.{latest_name}.{os.getpid()}.tmp'
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.relpath(candidate, folder), tmp)
        os.replace(tmp, latest)
        say(f'autoresume: resuming from {candidate}, the newest readable checkpoint')
        return candidate
    raise CheckpointError(f'autoresume: no readable checkpoint in {folder}: {latest} points at an unreadable one '
                          f'({first_error})' + (f'; unreadable too: {[str(p) for p, _ in skipped[1:]]}'
                                                if len(skipped) > 1 else ''))


def check_before_load(trainer_cfg: dict[str, Any], run_name: Optional[str], rank: int,
                      say: Callable[[str], None] = print) -> None:
    """What ``build_trainer`` runs before any model is built: the checkpoint the Trainer will load is readable.

    With ``trainer.autoresume`` and a local save folder, global rank 0 runs :func:`skip_unreadable_latest` (the other
    ranks read ``latest`` only inside the Trainer, after a collective that rank 0 reaches once it is done). A local
    ``trainer.load_path`` that the run will load (no autoresume checkpoint) is checked by :func:`check_checkpoint`.
    Object-store paths are left to Composer.

    Raises:
        CheckpointError: Naming the unreadable checkpoint.
    """
    from composer.utils import format_name_with_dist

    folder = trainer_cfg.get('save_folder')
    resuming = False
    if trainer_cfg.get('autoresume') and folder and '://' not in folder:
        folder = Path(format_name_with_dist(folder, run_name or ''))
        latest = format_name_with_dist(str(trainer_cfg.get('save_latest_filename') or 'latest-rank{rank}.pt').replace(
            '{rank}', '0'), run_name or '')
        if rank == 0 and folder.is_dir():
            resuming = skip_unreadable_latest(folder, latest, say=say) is not None
        else:
            resuming = os.path.lexists(folder / latest)
    load_path = trainer_cfg.get('load_path')
    if load_path and not resuming and '://' not in str(load_path):
        try:
            kind = check_checkpoint(load_path)
        except CheckpointError as e:
            raise CheckpointError(f'trainer.load_path: {e}') from None
        legacy = _legacy_keys(_read_metadata(Path(load_path)), _renamer(_default_renames())) if kind == 'sharded' else []
        if legacy:
            raise CheckpointError(
                f'trainer.load_path: the sharded checkpoint {load_path} was written before model keys were renamed '
                f'({", ".join(legacy)}); migrate it once with: python -c "from '
                f"senseflow_algos.checkpointing import migrate_sharded_checkpoint as m; m('{load_path}')\"")


# ---------------------------------------------------------------------------------------------------------------------
# Renamed keys


def migrate_sharded_checkpoint(path: str | Path, renames: Optional[dict[str, str]] = None) -> list[str]:
    """Rename the model keys of a sharded checkpoint written before they were renamed, in place (idempotent).

    torch.distributed.checkpoint loads a sharded checkpoint by the current model's key names, so a key that has since
    been renamed (the batch counter ``ttur_step``, now ``batches_seen``) is missing from it. This rewrites the names in
    the folder's ``.metadata`` (the shards are left as they are); run it once per checkpoint before resuming::

        python -c "from senseflow_algos.checkpointing import migrate_sharded_checkpoint as m; m('runs/x/ep0-ba4')"

    Unsharded ``.pt`` checkpoints need no migration: the model renames their old keys as it loads them.

    Args:
        path: The sharded checkpoint folder (holding ``.metadata``).
        renames: Old -> new name of the last key component under the model's state. Default:
            :data:`senseflow_algos.models.dmd.LEGACY_KEYS`.

    Returns:
        list[str]: The flattened keys renamed (empty if the checkpoint was already current).

    Raises:
        CheckpointError: If ``path`` is not a sharded checkpoint.
    """
    renames = _default_renames() if renames is None else renames
    path = Path(path)
    if checkpoint_kind(path) != 'sharded':
        raise CheckpointError(f'{path} is not a sharded checkpoint folder; unsharded checkpoints load without migration')
    metadata = _read_metadata(path)
    renamed = _renamer(renames)
    old = _legacy_keys(metadata, renamed)
    if not old:
        return []
    metadata.state_dict_metadata = {renamed(k): v for k, v in metadata.state_dict_metadata.items()}
    metadata.storage_data = {dataclasses.replace(k, fqn=renamed(k.fqn)): v for k, v in metadata.storage_data.items()}
    if isinstance(metadata.planner_data, dict):  # DefaultSavePlanner: flattened key -> path in the nested state dict
        metadata.planner_data = {
            renamed(k): (*v[:-1], renames[v[-1]]) if renamed(k) != k else v for k, v in metadata.planner_data.items()}
    fd, tmp = tempfile.mkstemp(prefix='.partial-', dir=path)
    with os.fdopen(fd, 'wb') as f:
        pickle.dump(metadata, f)
    os.replace(tmp, path / SHARDED_METADATA)
    return old


def _renamer(renames: dict[str, str]) -> Callable[[str], str]:
    """Flattened checkpoint key -> its current name (model keys whose last component was renamed)."""
    def renamed(fqn: str) -> str:
        head, _, last = fqn.rpartition('.')
        if head.split('.')[:2] == ['state', 'model'] and last in renames:
            return f'{head}.{renames[last]}'
        return fqn

    return renamed


def _default_renames() -> dict[str, str]:
    from senseflow_algos.models.dmd import LEGACY_KEYS  # lazily: checking a checkpoint imports no model code

    return LEGACY_KEYS


def _read_metadata(path: Path) -> Any:
    """The ``.metadata`` of the sharded checkpoint folder ``path``."""
    with open(path / SHARDED_METADATA, 'rb') as f:
        return pickle.load(f)


def _legacy_keys(metadata: Any, renamed: Callable[[str], str]) -> list[str]:
    """The flattened keys of a sharded checkpoint's ``metadata`` that ``renamed`` changes."""
    return [fqn for fqn in metadata.state_dict_metadata if renamed(fqn) != fqn]
