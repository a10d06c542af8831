"""A stored sample that cannot be used (:class:`BadSample`) and the image decoding shared by the ``data_prep/``
writers and the training data (:mod:`senseflow_algos.data.streaming`)."""

from __future__ import annotations

import io
from typing import Any

__all__ = ['BadSample', 'open_image']


class BadSample(ValueError):
    """A record or sample that cannot be used (unreadable image, empty caption, wrong shape, ...)."""


def open_image(data: Any):
    """Raw image bytes (or a PIL image) to an RGB PIL image with EXIF orientation applied; :class:`BadSample` if
    the bytes do not decode."""
    from PIL import Image, ImageOps

    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        image.load()
        return image.convert('RGB')
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample(f'unreadable image ({type(e).__name__}: {e})') from None
