"""Run folders and checkpoints in an object store (``s3://``, ``gs://``, ``oci://``, ...), through Composer's own
object-store clients (:func:`composer.utils.maybe_create_object_store_from_uri`, :func:`composer.utils.get_file`).

A run saving to ``trainer.save_folder=s3://bucket/runs/x`` leaves in the bucket what Composer uploads: unsharded
``runs/x/ep0-ba4-rank0.pt``, sharded ``runs/x/ep0-ba4/.metadata`` and ``runs/x/ep0-ba4/__<rank>_0.distcp``, and
``runs/x/latest-rank0.pt.symlink`` (a small object holding the name of the latest checkpoint file or folder); and
``runs/x/run_config.yaml`` (:func:`upload_file`, from :func:`senseflow_algos.builders.save_run_config`).
:func:`fetch_checkpoint` downloads one checkpoint and the run config into a local folder laid out the same way, so the
local code reads it. Credentials and endpoints are the object store's usual environment variables (for S3:
``AWS_ACCESS_KEY_ID`` ..., ``S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

from senseflow_algos.checkpointing import SHARDED_METADATA, CheckpointError

__all__ = ['RUN_CONFIG', 'LATEST_SYMLINK', 'is_uri', 'fetch_checkpoint', 'upload_file']

#: The run config's name in a save folder.
RUN_CONFIG = 'run_config.yaml'
#: What Composer uploads as the remote ``latest`` link of rank 0.
LATEST_SYMLINK = 'latest-rank0.pt.symlink'


def is_uri(path: object) -> bool:
    """Whether ``path`` is an object-store URI (``scheme://...``) rather than a local path."""
    return '://' in str(path)


def _store(uri: str):
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    try:
        store = maybe_create_object_store_from_uri(uri)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f'{uri}: {e}') from None
    return store, parse_uri(uri)[2].strip('/')


def _get(store, name: str, dest: Path) -> bool:
    """Download object ``name`` to ``dest``; ``False`` if there is no such object."""
    from composer.utils import get_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        get_file(name, str(dest), object_store=store, overwrite=True, progress_bar=False)
    except FileNotFoundError:
        return False
    return True


def _is_file_name(key: str) -> bool:
    """Whether an object name is a checkpoint file (not a folder): Composer's checkpoint and weight suffixes."""
    return key.endswith(('.pt', '.safetensors', '.pt.lz4', '.pt.zst', '.pt.gz', '.tar', '.tar.gz'))


def _get_link(store, name: str, dest: Path) -> bool:
    """Download the ``.symlink`` object ``name`` itself (``get_file`` would follow it to the file it names)."""
    try:
        store.download_object(name, str(dest), overwrite=True)
    except FileNotFoundError:
        return False
    return True


def _fetch_sharded(store, uri: str, key: str, dest: Path) -> Optional[Path]:
    from torch.distributed.checkpoint import FileSystemReader

    folder = dest / Path(key).name
    if _is_file_name(key) or not _get(store, f'{key}/{SHARDED_METADATA}', folder / SHARDED_METADATA):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return None
    metadata = FileSystemReader(str(folder)).read_metadata()
    for name in sorted({info.relative_path for info in (metadata.storage_data or {}).values()}):
        if not _get(store, f'{key}/{name}', folder / name):
            raise CheckpointError(f'shard {uri.rstrip("/")}/{name} of the sharded checkpoint {uri} is missing from '
                                  f'the object store (its {SHARDED_METADATA} lists it)')
    return folder


def fetch_checkpoint(uri: str, dest: str | Path, say: Callable[[str], None] = print) -> Path:
    """Download a checkpoint from an object store into ``dest``, with the run's ``run_config.yaml`` when it has one.

    Args:
        uri (str): A run folder (``s3://bucket/runs/x``: its ``latest-rank0.pt.symlink``), a sharded checkpoint folder
            (``.../ep0-ba4``) or a checkpoint file (``.../ep0-ba4-rank0.pt``, ``.../generator.safetensors``).
        dest: Local folder; ``dest/run_config.yaml`` and ``dest/<checkpoint name>`` are written.
        say: Progress lines. Default: ``print``.

    Returns:
        Path: The local checkpoint file or sharded folder.

    Raises:
        CheckpointError: Nothing at ``uri``, naming what was looked for.
    """
    store, key = _store(uri)
    dest = Path(dest)
    say(f'downloading {uri} to {dest}')
    if _is_file_name(key):
        checkpoint, run = dest / Path(key).name, str(Path(key).parent)
        if not _get(store, key, checkpoint):
            raise CheckpointError(f'checkpoint {uri} does not exist in the object store')
    else:
        checkpoint, run = _fetch_sharded(store, uri, key, dest), str(Path(key).parent)
        if checkpoint is None:  # a run folder: follow Composer's remote latest link
            with tempfile.TemporaryDirectory() as tmp:
                if not _get_link(store, f'{key}/{LATEST_SYMLINK}', Path(tmp) / 'latest'):
                    raise CheckpointError(f'{uri} holds no checkpoint: no {SHARDED_METADATA} (a sharded checkpoint) '
                                          f'and no {LATEST_SYMLINK} (a run folder); pass the URI of a checkpoint')
                real = (Path(tmp) / 'latest').read_text().strip().strip('/')
            say(f'{uri}/{LATEST_SYMLINK} -> {real}')
            run = key
            checkpoint = _fetch_sharded(store, uri, real, dest)
            if checkpoint is None:
                checkpoint = dest / Path(real).name
                if not _get(store, real, checkpoint):
                    raise CheckpointError(f'{uri}/{LATEST_SYMLINK} points at {real}, which is not in the object store')
    if not _get(store, f'{run}/{RUN_CONFIG}' if run not in ('', '.') else RUN_CONFIG, dest / RUN_CONFIG):
        say(f'no {RUN_CONFIG} next to {uri} in the object store')
    return checkpoint


def upload_file(folder_uri: str, name: str, local: str | Path) -> str:
    """Upload ``local`` as ``<folder_uri>/<name>`` with Composer's object store for the URI; returns the object URI."""
    store, key = _store(folder_uri)
    store.upload_object(f'{key}/{name}' if key else name, str(local))
    return f'{folder_uri.rstrip("/")}/{name}'
