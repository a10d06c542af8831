"""Intra-Segment Guidance: the generator's jump over a segment must match a teacher-then-generator path.

See the :doc:`README <README>` for usage and suggested hyperparameters.
"""

from senseflow_algos.algorithms.isg.isg import IntraSegmentGuidance, check_segments, isg_loss, isg_target, mid_sigma

__all__ = ['IntraSegmentGuidance', 'isg_loss', 'isg_target', 'mid_sigma', 'check_segments']
