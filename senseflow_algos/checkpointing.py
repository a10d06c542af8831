"""Crash-safe checkpoint files.

Composer 0.32.1 writes a checkpoint straight to its final name and then re-points ``latest-rank{rank}.pt``. A
process killed mid-write leaves a truncated file under a real checkpoint name. Here the file is written to a
temporary name in the same folder and renamed into place (atomic on POSIX), so a checkpoint file that exists is
complete, and ``latest`` only ever points at complete files. Sharded (FSDP) checkpoints go through
torch.distributed.checkpoint, which writes its own metadata file last, and are not affected.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import composer.utils.checkpoint as composer_checkpoint

__all__ = ['install_atomic_checkpoint_writes']

_original_write = composer_checkpoint._write_checkpoint_file


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
