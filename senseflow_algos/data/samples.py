"""A stored sample that cannot be used (:class:`BadSampleError`) and the image decoding shared by the ``data_prep/``
writers and the training data (:mod:`senseflow_algos.data.streaming`)."""

from __future__ import annotations

import io
from typing import Any

__all__ = ['BadSampleError', 'open_image']


class BadSampleError(ValueError):
    """Bad data: a record or sample that cannot be used (unreadable image, empty caption, wrong shape, ...), or a
    shard or stream that cannot be read as the run asks.

    One class for every stage: a per-sample check raises it with what is wrong; the reader that knows the location
    (``data_prep/`` part writer, :class:`~senseflow_algos.data.streaming.SenseflowStreamingDataset`) either skips
    the sample (``--on-bad skip``, ``dataset.bad_samples=skip``) or raises it again naming the stream, shard and
    sample.
    """


def open_image(data: Any):
    """Raw image bytes (or a PIL image) to an RGB PIL image with EXIF orientation applied; :class:`BadSampleError`
    if the bytes do not decode."""
    from PIL import Image, ImageOps

    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        image.load()
        return image.convert('RGB')
    except Exception as e:  # PIL raises many types for broken files
        raise BadSampleError(f'unreadable image ({type(e).__name__}: {e})') from None
