"""The config's dtype names (``model.dtype``, ``export.py --dtype``, ``eval.py --dtype``) and their torch dtypes."""

from __future__ import annotations

import torch

__all__ = ['DTYPES', 'dtype_name']

#: Config spelling -> torch dtype.
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16`` (the config's spelling; other dtypes as torch names them, without ``torch.``)."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace('torch.', ''))
