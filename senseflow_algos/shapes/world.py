"""The shapes world: a seeded procedural renderer of small captioned images with ground-truth attributes.

Every sample is a 32x32 RGB image of one or two flat shapes (circle, square, triangle) in one of six colours on a
plain grey background, with a caption from a small grammar and the attributes that make the caption true::

    a red circle
    a green triangle on the left            (position: the shape's centre lies in that half of the image)
    a blue square above a yellow triangle   (relation: first object's centre above the second's)
    a purple circle to the right of a cyan square
    a red square and a green circle         (two objects, no relation)

Sample ``i`` of seed ``s`` is a pure function of ``(s, i)`` (numpy ``default_rng([s, i])``), so the world is infinite
and any sample can be re-rendered on its own. Shapes are rendered 4x supersampled and box-filtered (anti-aliased).

Two objects of one scene never share both colour and shape, never overlap, and a relation caption always holds
along its axis with a clear margin (the two shapes do not overlap in the projection on that axis). Every caption
word is a single token of the tiny CLIP / T5 tokenizers in :mod:`senseflow_algos.models.tiny`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = [
    'COLOURS', 'SHAPES', 'POSITIONS', 'RELATIONS', 'RESOLUTION', 'BACKGROUND', 'ShapeObject', 'Scene',
    'sample_scene', 'render', 'render_sample', 'caption_of', 'parse_caption', 'ShapesDataset',
    'ShapesIterableDataset', 'build_shapes_dataloader', 'collate_samples', 'prompt_set'
]

RESOLUTION = 32
#: Colour name -> RGB in [0, 1] (well separated in hue, all distinct from the grey background).
COLOURS: dict[str, tuple[float, float, float]] = {
    'red': (0.86, 0.14, 0.14),
    'green': (0.16, 0.70, 0.22),
    'blue': (0.16, 0.30, 0.88),
    'yellow': (0.95, 0.85, 0.15),
    'purple': (0.58, 0.22, 0.78),
    'cyan': (0.15, 0.82, 0.85),
}
SHAPES = ('circle', 'square', 'triangle')
#: Single-shape position phrase -> (axis, side): axis 0 = x (columns), 1 = y (rows); side -1 = low half.
POSITIONS: dict[str, tuple[int, int]] = {'left': (0, -1), 'right': (0, 1), 'top': (1, -1), 'bottom': (1, 1)}
#: Relation phrase -> (axis, sign of first minus second centre).
RELATIONS: dict[str, tuple[int, int]] = {
    'above': (1, -1),
    'below': (1, 1),
    'to the left of': (0, -1),
    'to the right of': (0, 1),
    'and': (-1, 0),
}
BACKGROUND = (0.5, 0.5, 0.5)
_SUPERSAMPLE = 4
_COLOUR_JITTER = 0.04
#: Size s in pixels: every shape lies in the 2s x 2s box around its centre (circle radius s, square side 1.8 s,
#: triangle 2s wide and 2s high).
_MIN_SIZE, _MAX_SIZE = 4.5, 7.5
_P_SINGLE = 0.5            # fraction of one-shape scenes
_P_POSITION = 0.5          # fraction of one-shape captions that name a position
_P_AND = 0.2               # fraction of two-shape captions without a relation


@dataclass
class ShapeObject:
    """One rendered shape: its attributes and geometry (pixels, origin top-left, x = column, y = row)."""
    colour: str
    shape: str
    x: float
    y: float
    size: float
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Scene:
    """A sample's ground truth: objects in caption order, the caption's position or relation phrase."""
    objects: list[ShapeObject]
    position: Optional[str] = None  # single-shape scenes only; None = not captioned
    relation: Optional[str] = None  # two-shape scenes only
    caption: str = ''
    attributes: dict = field(default_factory=dict)


def caption_of(objects: list[ShapeObject], position: Optional[str] = None, relation: Optional[str] = None) -> str:
    """The grammar: ``a <c> <s> [on the <pos>]`` or ``a <c> <s> <relation> a <c> <s>``."""
    first = f'a {objects[0].colour} {objects[0].shape}'
    if len(objects) == 1:
        return first + (f' on the {position}' if position else '')
    return f'{first} {relation} a {objects[1].colour} {objects[1].shape}'


def parse_caption(caption: str) -> dict:
    """Inverse of :func:`caption_of`: ``{'objects': [(colour, shape), ...], 'position': str|None,
    'relation': str|None}``.

    Raises:
        ValueError: If the caption is not in the grammar.
    """
    words = caption.strip().lower().split()
    if len(words) < 3 or words[0] != 'a' or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f'caption not in the shapes grammar: {caption!r}')
    objects = [(words[1], words[2])]
    rest = words[3:]
    if not rest:
        return {'objects': objects, 'position': None, 'relation': None}
    if len(rest) == 3 and rest[:2] == ['on', 'the'] and rest[2] in POSITIONS:
        return {'objects': objects, 'position': rest[2], 'relation': None}
    for relation in RELATIONS:
        rw = relation.split()
        tail = rest[len(rw):]
        if rest[:len(rw)] == rw and len(tail) == 3 and tail[0] == 'a' and tail[1] in COLOURS and tail[2] in SHAPES:
            return {'objects': objects + [(tail[1], tail[2])], 'position': None, 'relation': relation}
    raise ValueError(f'caption not in the shapes grammar: {caption!r}')


def _random_object(rng: np.random.Generator, colour: str, shape: str, x_range, y_range, size: float) -> ShapeObject:
    base = np.array(COLOURS[colour])
    rgb = np.clip(base + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3), 0, 1)
    return ShapeObject(colour, shape, float(rng.uniform(*x_range)), float(rng.uniform(*y_range)), size,
                       tuple(float(c) for c in rgb))


def _half_range(size: float, r: int, axis_side: Optional[int]) -> tuple[float, float]:
    """Centre range inside the image; ``axis_side`` -1 / 1 keeps the centre clearly in the low / high half."""
    lo, hi = size + 0.5, r - size - 0.5
    if axis_side == -1:
        hi = min(hi, r / 2 - 2.5)
    elif axis_side == 1:
        lo = max(lo, r / 2 + 2.5)
    return lo, hi


def sample_scene(seed: int, index: int, resolution: int = RESOLUTION, num_objects: Optional[int] = None) -> Scene:
    """The scene (ground truth and caption) of sample ``index`` of ``seed``; deterministic.

    Args:
        num_objects (int, optional): Force one or two objects (else 1 with probability 0.5).
    """
    rng = np.random.default_rng([int(seed), int(index)])
    r = resolution
    n = num_objects or (1 if rng.random() < _P_SINGLE else 2)
    colours, shapes = list(COLOURS), list(SHAPES)
    if n == 1:
        colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
        size = float(rng.uniform(_MIN_SIZE, _MAX_SIZE))
        position = list(POSITIONS)[rng.integers(len(POSITIONS))] if rng.random() < _P_POSITION else None
        xs = ys = None
        if position:
            axis, side = POSITIONS[position]
            xs, ys = (side, None) if axis == 0 else (None, side)
        obj = _random_object(rng, colour, shape, _half_range(size, r, xs), _half_range(size, r, ys), size)
        scene = Scene([obj], position=position)
    else:
        # Two distinct (colour, shape) pairs.
        pairs = [(c, s) for c in colours for s in shapes]
        i, j = rng.choice(len(pairs), size=2, replace=False)
        relation = 'and' if rng.random() < _P_AND else list(RELATIONS)[rng.integers(len(RELATIONS) - 1)]
        axis, sign = RELATIONS[relation]
        for _ in range(1000):
            sizes = rng.uniform(_MIN_SIZE, _MAX_SIZE - 1.0, 2)
            a = _random_object(rng, *pairs[i], _half_range(sizes[0], r, None), _half_range(sizes[0], r, None),
                               float(sizes[0]))
            b = _random_object(rng, *pairs[j], _half_range(sizes[1], r, None), _half_range(sizes[1], r, None),
                               float(sizes[1]))
            gap = a.size + b.size + 1.0
            if max(abs(a.x - b.x), abs(a.y - b.y)) < gap:
                continue  # the bounding boxes overlap
            if axis >= 0:
                d = (b.x - a.x, b.y - a.y)[axis] * -sign  # > 0 when the relation holds
                if d < gap:
                    continue  # the relation must hold with a margin: no overlap of the projections on its axis
            break
        else:  # pragma: no cover - the constraints are satisfiable for every size drawn
            raise RuntimeError(f'could not place two shapes for sample ({seed}, {index})')
        scene = Scene([a, b], relation=relation)
    scene.caption = caption_of(scene.objects, scene.position, scene.relation)
    scene.attributes = {
        'objects': [asdict(o) for o in scene.objects],
        'position': scene.position,
        'relation': scene.relation,
        'num_objects': len(scene.objects),
    }
    return scene


def _shape_mask(obj: ShapeObject, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - obj.x, yy - obj.y
    s = obj.size
    if obj.shape == 'circle':
        return dx * dx + dy * dy <= s * s
    if obj.shape == 'square':
        return (np.abs(dx) <= s * 0.9) & (np.abs(dy) <= s * 0.9)
    if obj.shape == 'triangle':
        # Upright isosceles triangle filling its 2s x 2s bounding box: apex at the top, base at the bottom.
        half_w = (dy + s) / 2
        return (dy >= -s) & (dy <= s) & (np.abs(dx) <= half_w)
    raise ValueError(f'unknown shape {obj.shape!r}')


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """Render a scene as float32 ``(3, R, R)`` in [0, 1] (anti-aliased by 4x supersampling)."""
    ss = _SUPERSAMPLE
    coords = (np.arange(resolution * ss, dtype=np.float32) + 0.5) / ss
    yy, xx = np.meshgrid(coords, coords, indexing='ij')
    img = np.empty((3, resolution * ss, resolution * ss), dtype=np.float32)
    img[:] = np.array(BACKGROUND, dtype=np.float32)[:, None, None]
    for obj in scene.objects:
        mask = _shape_mask(obj, yy, xx)
        img[:, mask] = np.array(obj.rgb, dtype=np.float32)[:, None]
    return img.reshape(3, resolution, ss, resolution, ss).mean(axis=(2, 4))


def render_sample(seed: int, index: int, resolution: int = RESOLUTION, num_objects: Optional[int] = None) -> dict:
    """``{'image': (3, R, R) float tensor in [-1, 1], 'prompt': str, 'attributes': dict}``."""
    scene = sample_scene(seed, index, resolution, num_objects)
    image = torch.from_numpy(render(scene, resolution)) * 2 - 1
    return {'image': image, 'prompt': scene.caption, 'attributes': scene.attributes}


def collate_samples(samples: list[dict]) -> dict:
    """Stack images, list prompts and attributes (attributes are nested dicts, left as a list)."""
    return {
        'image': torch.stack([s['image'] for s in samples]),
        'prompt': [s['prompt'] for s in samples],
        'attributes': [s['attributes'] for s in samples],
    }


class ShapesDataset(Dataset):
    """Map-style window ``[offset, offset + num_samples)`` of the infinite world of ``seed``.

    Args:
        num_samples (int): Length. seed (int): World seed. resolution (int): Image side (default 32).
        num_objects (int, optional): Force one- or two-shape scenes. offset (int): First index.
        with_attributes (bool): Include the ground-truth ``attributes`` dict (the default collate of a DataLoader
            cannot stack it; use :func:`collate_samples`). Default: ``True``.
    """

    def __init__(self, num_samples: int, seed: int = 0, resolution: int = RESOLUTION,
                 num_objects: Optional[int] = None, offset: int = 0, with_attributes: bool = True):
        self.num_samples, self.seed, self.resolution = int(num_samples), int(seed), int(resolution)
        self.num_objects, self.offset, self.with_attributes = num_objects, int(offset), with_attributes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        sample = render_sample(self.seed, self.offset + index, self.resolution, self.num_objects)
        if not self.with_attributes:
            sample.pop('attributes')
        return sample


class ShapesIterableDataset(IterableDataset):
    """The infinite stream ``index = start, start + 1, ...`` of the world of ``seed`` (split across workers)."""

    def __init__(self, seed: int = 0, resolution: int = RESOLUTION, start: int = 0,
                 num_objects: Optional[int] = None):
        self.seed, self.resolution, self.start, self.num_objects = seed, resolution, start, num_objects

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + wid
        while True:
            yield render_sample(self.seed, index, self.resolution, self.num_objects)
            index += nw


def prompt_set(num: int, seed: int, num_objects: Optional[int] = None) -> list[str]:
    """Captions of samples ``0..num-1`` of a world seed (evaluation prompts)."""
    return [sample_scene(seed, i, num_objects=num_objects).caption for i in range(num)]


def build_shapes_dataloader(batch_size: int, resolution: int = RESOLUTION, num_samples: int = 100_000,
                            seed: int = 0, num_workers: int = 0, world_seed: Optional[int] = None) -> DataLoader:
    """Dataloader of ``{'image', 'prompt'}`` batches from the shapes world (``batch_size`` per device).

    ``world_seed`` (default: the run seed) picks the world's sample stream; each rank reads its own slice of a
    ``num_samples`` window, in order, so a resumed run sees the batches an uninterrupted run would.
    """
    from composer.utils import dist

    dataset = ShapesDataset(num_samples, seed=seed if world_seed is None else world_seed, resolution=resolution,
                            with_attributes=False)
    sampler = dist.get_sampler(dataset, shuffle=False, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers)
