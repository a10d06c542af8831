"""Training data."""

from senseflow_algos.data.synthetic import COLOURS, SyntheticCaptionedImages, build_synthetic_dataloader

__all__ = ['COLOURS', 'SyntheticCaptionedImages', 'build_synthetic_dataloader']
