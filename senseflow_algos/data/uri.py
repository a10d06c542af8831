"""Files at a local path or an object-store URI (``s3://``, ``gs://``, ``oci://``, ``azure://``, ...): what the
training data (:mod:`senseflow_algos.data.streaming`) and the ``data_prep/`` writers read and write through
Streaming's downloader and uploader."""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Optional

__all__ = ['is_remote', 'join_uri', 'read_file', 'write_file', 'file_exists']


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object-store URI (``s3://...``) rather than a local path."""
    return urllib.parse.urlparse(str(path)).scheme not in ('', 'file')


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for a local folder or a URI."""
    if is_remote(root):
        return '/'.join([str(root).rstrip('/'), *[p.strip('/') for p in parts]])
    return os.path.join(root, *parts)


def read_file(uri: str, timeout: float = 60) -> Optional[bytes]:
    """Bytes of a local file or remote object, ``None`` if it does not exist."""
    if not is_remote(uri):
        return Path(uri).read_bytes() if os.path.isfile(uri) else None
    from streaming.base.storage import CloudDownloader

    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, 'file')
        try:
            CloudDownloader.direct_download(uri, dest, timeout)
        except Exception:  # a missing object is reported differently by every provider
            return None
        return Path(dest).read_bytes() if os.path.isfile(dest) else None


def file_exists(uri: str) -> bool:
    return os.path.isfile(uri) if not is_remote(uri) else read_file(uri) is not None


def write_file(root: str, name: str, data: bytes) -> None:
    """Write ``root/name`` (local folder or remote URI, through Streaming's uploader)."""
    if not is_remote(root):
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f'.{name}.tmp{os.getpid()}')
        Path(tmp).write_bytes(data)
        os.replace(tmp, os.path.join(root, name))
        return
    from streaming.base.storage import CloudUploader

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, name).write_bytes(data)
        CloudUploader.get((tmp, str(root)), keep_local=True, exist_ok=True).upload_file(name)
