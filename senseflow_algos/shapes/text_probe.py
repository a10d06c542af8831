"""The teacher's text path, taught the caption's structure: an auxiliary scene decoder on the text encoders' outputs.

FLUX gives every T5 token the same RoPE position (``txt_ids`` are zeros), so inside the transformer the text is a set
of token vectors: which colour belongs to which shape, and which object a relation puts first, must already be in the
vectors. A real T5 learnt that from language; the shapes teacher's T5 (and CLIP) start from random weights, and the
diffusion loss alone teaches them little of it (the first teacher's relation accuracy was at chance). This head reads
the caption's structure back from the encoders' outputs the way the transformer can: learned queries attending over
the T5 tokens with no position information, and linear heads on CLIP's pooled vector. Its cross-entropy is the stage
``text`` objective (text encoders pre-trained on captions alone) and an auxiliary loss during ``t2i``. It is dropped
at export: the shipped pipeline holds only the diffusers components.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from senseflow_algos.shapes.world import COLOURS, POSITIONS, RELATIONS, SHAPES, parse_caption

__all__ = ['FIELDS', 'caption_labels', 'TextProbe']

_PLACES = ('none', *POSITIONS, *RELATIONS)
#: What is read back from a caption: field name -> its classes (``none``: the caption has no second object / place).
FIELDS: dict[str, tuple[str, ...]] = {
    'colour_1': tuple(COLOURS),
    'shape_1': SHAPES,
    'colour_2': ('none', *COLOURS),
    'shape_2': ('none', *SHAPES),
    'place': _PLACES,
}


def caption_labels(captions: Sequence[str]) -> torch.Tensor:
    """``(B, len(FIELDS))`` class indices of each caption's fields (:data:`FIELDS`); an empty caption gets -1 (ignored
    by the loss)."""
    rows = []
    for caption in captions:
        if not caption:
            rows.append([-1] * len(FIELDS))
            continue
        p = parse_caption(caption)
        (c1, s1), second = p['objects'][0], (p['objects'][1:] or [('none', 'none')])[0]
        place = p['position'] or p['relation'] or 'none'
        values = {'colour_1': c1, 'shape_1': s1, 'colour_2': second[0], 'shape_2': second[1], 'place': place}
        rows.append([FIELDS[k].index(values[k]) for k in FIELDS])
    return torch.tensor(rows, dtype=torch.long)


class TextProbe(nn.Module):
    """Reads :data:`FIELDS` from T5 token outputs (one learned query per field, position-free attention, as FLUX sees
    the tokens) and from CLIP's pooled vector (one linear head per field).

    Args:
        t5_width: T5 ``d_model``.
        clip_width: CLIP pooled width.
        heads: Attention heads of the query read-out.
    """

    def __init__(self, t5_width: int, clip_width: int, heads: int = 4):
        super().__init__()
        sizes = [len(v) for v in FIELDS.values()]
        self.queries = nn.Parameter(torch.randn(len(sizes), t5_width) * 0.02)
        self.attention = nn.MultiheadAttention(t5_width, heads, batch_first=True)
        self.t5_heads = nn.ModuleList(nn.Linear(t5_width, n) for n in sizes)
        self.clip_heads = nn.ModuleList(nn.Linear(clip_width, n) for n in sizes)

    def forward(self, cond: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits per field: ``(from T5, from CLIP)``, each a list of ``(B, classes)``."""
        tokens, pooled = cond['prompt_embeds'], cond['pooled_prompt_embeds']
        read, _ = self.attention(self.queries.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return ([h(read[:, i]) for i, h in enumerate(self.t5_heads)], [h(pooled) for h in self.clip_heads])

    def loss(self, cond: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy over fields and both encoders (empty captions ignored), and the fraction of captions
        whose every field both encoders read correctly."""
        t5_logits, clip_logits = self(cond)
        losses, right = [], torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        for i, (a, b) in enumerate(zip(t5_logits, clip_logits)):
            y = labels[:, i]
            losses += [F.cross_entropy(a, y, ignore_index=-1), F.cross_entropy(b, y, ignore_index=-1)]
            right &= (a.argmax(-1) == y) & (b.argmax(-1) == y)
        kept = labels[:, 0] >= 0
        accuracy = right[kept].float().mean().item() if kept.any() else float('nan')
        return torch.stack(losses).mean(), accuracy
