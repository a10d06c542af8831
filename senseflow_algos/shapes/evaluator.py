"""The shapes-world evaluator: attribute accuracy (the toy GenEval / T2I-CompBench) and a Fréchet distance (the
toy FID) in the feature space of a small CNN trained on the renderer's ground truth.

The network is independent of the VFM discriminator's ViT (a different architecture, trained separately, by
:mod:`senseflow_algos.shapes.train_evaluator`, with different world seeds). It reads a 32x32 image and predicts,
for each of the 18 (colour, shape) combinations:

* a 16x16 heat-map whose spatial maximum is the combination's presence logit and whose spatial softmax gives
  its centre (soft-argmax), and
* from a global 128-d embedding (the FD feature space), presence, centre and size again and the blur, noise and
  contrast of the image (auxiliary targets that make the embedding describe what, where, how big and how clean).

A prompt is then checked against the detections ``D`` (combinations with presence > 0.5 after non-maximum
suppression across combinations within 4 px; the most likely one if none is): per named object, its colour is in ``D`` (``colour``), its shape is in ``D`` (``shape``), the pair is
in ``D`` (``object``); ``count``: ``|D|`` equals the number of named objects; ``position``: the object's
detected centre lies in the named half; ``relation``: both objects detected and their centres ordered along the
relation's axis. ``prompt`` accuracy requires all of them (every named object, count, position or relation):
this is "attribute accuracy" in reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from senseflow_algos.shapes.components import EVALUATOR_WEIGHTS, RESOLUTION
from senseflow_algos.shapes.world import COLOURS, POSITIONS, RELATIONS, SHAPES, parse_caption

__all__ = ['COMBOS', 'EvaluatorNet', 'ShapesEvaluator', 'combo_index', 'METRICS']

COMBOS = [(c, s) for c in COLOURS for s in SHAPES]
_COMBO_INDEX = {cs: i for i, cs in enumerate(COMBOS)}
#: Detections closer than this (pixels) are one object (non-maximum suppression).
NMS_RADIUS = 4.0
METRICS = ('prompt', 'colour', 'shape', 'object', 'count', 'position', 'relation')


def combo_index(colour: str, shape: str) -> int:
    return _COMBO_INDEX[(colour, shape)]


def _conv(cin, cout, dilation=1, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EvaluatorNet(nn.Module):
    """CNN: 32x32 -> 16x16 trunk (stride-2, then dilated convs) -> per-combination heat-maps; 4x4 -> 128-d embedding -> aux."""

    def __init__(self, width: int = 32, embed_dim: int = 128):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(_conv(3, w // 2), _conv(w // 2, w, stride=2), _conv(w, w), _conv(w, w, 2),
                                   _conv(w, w, 4), _conv(w, w, 2))
        self.heat = nn.Conv2d(w, len(COMBOS), 1)
        self.down = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w, stride=2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, embed_dim), nn.ReLU(inplace=True))
        self.aux = nn.Linear(embed_dim, 4 * len(COMBOS))  # presence logit, cx, cy, size per combination
        self.quality = nn.Linear(embed_dim, 3)  # blur std, noise std, contrast - 1 of the (augmented) image
        h = RESOLUTION // 2
        coords = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        self.register_buffer('grid_x', coords.view(1, 1, 1, h).expand(1, 1, h, h).reshape(1, 1, -1), persistent=False)
        self.register_buffer('grid_y', coords.view(1, 1, h, 1).expand(1, 1, h, h).reshape(1, 1, -1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, 32, 32) in [-1, 1] -> presence logits (B, 18), centres (B, 18, 2) in [0, 1] (x, y),
        embedding (B, 128), aux (B, 18, 4)."""
        f = self.trunk(images)
        heat = self.heat(f).flatten(2)  # (B, 18, 256)
        prob = heat.softmax(-1)
        centre = torch.stack([(prob * self.grid_x).sum(-1), (prob * self.grid_y).sum(-1)], -1)
        emb = self.embed(self.down(f))
        return {'presence': heat.amax(-1), 'centre': centre, 'embedding': emb, 'heat': heat,
                'aux': self.aux(emb).view(-1, len(COMBOS), 4), 'quality': self.quality(emb)}


class ShapesEvaluator:
    """The trained evaluator network with prompt checking and FD.

    Args:
        weights (str | Path): Safetensors file written by :mod:`senseflow_algos.shapes.train_evaluator`.
        device: Torch device.
    """

    def __init__(self, weights: str | Path = EVALUATOR_WEIGHTS, device='cpu', net: Optional[EvaluatorNet] = None):
        if net is None:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(weights), framework='pt') as f:
                meta = f.metadata() or {}
            net = EvaluatorNet(width=int(meta.get('width', 32)), embed_dim=int(meta.get('embed_dim', 128)))
            net.load_state_dict(load_file(str(weights)))
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Presence probabilities (N, 18), centres in pixels (N, 18, 2) as (x, y), embeddings (N, 128)."""
        outs = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device).float().clamp(-1, 1)
            o = self.net(x)
            outs.append({'presence': o['presence'].sigmoid().cpu(), 'centre': o['centre'].cpu() * RESOLUTION,
                         'embedding': o['embedding'].cpu()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The FD feature space: the 128-d embedding."""
        return self.predict(images)['embedding']

    def fd(self, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
        """Fréchet distance between two image sets in the evaluator's feature space."""
        from senseflow_algos.evaluation.fid import fid_from_features

        return fid_from_features(self.features(images_a), self.features(images_b))

    @staticmethod
    def detect(presence: torch.Tensor, centre: torch.Tensor, threshold: float = 0.5) -> set[tuple[str, str]]:
        """Detected (colour, shape) pairs of one image: presence above ``threshold`` after non-maximum suppression
        (the most likely pair if none is above)."""
        detected = set()
        kept: list[list[float]] = []
        # Non-maximum suppression across combinations: one object, one detection (objects of a scene are at
        # least 10 px apart, so candidates closer than NMS_RADIUS are the same object read as two combinations).
        for i in presence.argsort(descending=True).tolist():
            if presence[i] <= threshold and detected:
                break
            c = centre[i].tolist()
            if all((c[0] - k[0])**2 + (c[1] - k[1])**2 > NMS_RADIUS**2 for k in kept):
                detected.add(COMBOS[i])
                kept.append(c)
            if presence[i] <= threshold:
                break  # nothing above the threshold: the single most likely combination
        return detected

    @staticmethod
    def check(prompt: str, presence: torch.Tensor, centre: torch.Tensor, threshold: float = 0.5) -> dict:
        """Per-metric verdicts (True / False, or None where the metric does not apply) for one image."""
        p = parse_caption(prompt)
        detected = ShapesEvaluator.detect(presence, centre, threshold)
        named = p['objects']
        colours = {c for c, _ in detected}
        shapes = {s for _, s in detected}
        out = {
            'colour': float(np.mean([c in colours for c, _ in named])),
            'shape': float(np.mean([s in shapes for _, s in named])),
            'object': float(np.mean([o in detected for o in named])),
            'count': len(detected) == len(named),
            'position': None,
            'relation': None,
        }

        def centre_of(obj):
            return centre[combo_index(*obj)].tolist()

        if p['position']:
            axis, side = POSITIONS[p['position']]
            out['position'] = named[0] in detected and (centre_of(named[0])[axis] - RESOLUTION / 2) * side > 0
        if p['relation'] and RELATIONS[p['relation']][0] >= 0:
            axis, sign = RELATIONS[p['relation']]
            ok = named[0] in detected and named[1] in detected
            out['relation'] = ok and (centre_of(named[0])[axis] - centre_of(named[1])[axis]) * sign > 0
        extra = [v for k, v in out.items() if k in ('position', 'relation') and v is not None]
        out['prompt'] = out['object'] == 1.0 and out['count'] and all(extra)
        return out

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Accuracy per metric over single-shape, two-shape and all prompts.

        Returns:
            ``{'single': {metric: acc}, 'two': {...}, 'all': {...}, 'per_image': [verdicts], 'n': {...}}``;
            accuracies are fractions in [0, 1] over the prompts where the metric applies.
        """
        pred = self.predict(images)
        verdicts = [self.check(pr, pred['presence'][i], pred['centre'][i]) for i, pr in enumerate(prompts)]
        groups = {'single': [], 'two': [], 'all': []}
        for pr, v in zip(prompts, verdicts):
            groups['single' if len(parse_caption(pr)['objects']) == 1 else 'two'].append(v)
            groups['all'].append(v)
        out = {'per_image': verdicts, 'n': {g: len(vs) for g, vs in groups.items()}}
        for g, vs in groups.items():
            out[g] = {}
            for m in METRICS:
                vals = [float(v[m]) for v in vs if v[m] is not None]
                out[g][m] = float(np.mean(vals)) if vals else float('nan')
        return out
