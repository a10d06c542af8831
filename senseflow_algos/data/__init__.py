"""Training data."""

from senseflow_algos.data.samples import BadSampleError
from senseflow_algos.data.synthetic import COLOURS, SyntheticCaptionedImages, build_synthetic_dataloader

__all__ = ['BadSampleError', 'COLOURS', 'SyntheticCaptionedImages', 'build_synthetic_dataloader']
