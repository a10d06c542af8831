"""A deterministic synthetic captioned-image dataset for tiny configs and tests.

Each sample is a coloured square on a plain background with the caption ``"a <colour> square"``; sample ``i``
is a pure function of ``(seed, i)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from senseflow_algos.registry import DATASETS

__all__ = ['SyntheticCaptionedImages', 'build_synthetic_dataloader', 'COLOURS']

#: Colour name -> RGB in [-1, 1].
COLOURS = {
    'red': (1.0, -1.0, -1.0),
    'green': (-1.0, 1.0, -1.0),
    'blue': (-1.0, -1.0, 1.0),
    'yellow': (1.0, 1.0, -1.0),
    'white': (1.0, 1.0, 1.0),
}


class SyntheticCaptionedImages(Dataset):
    """``{'image': (3, R, R) in [-1, 1], 'prompt': str}`` samples.

    Args:
        num_samples (int): Dataset length.
        resolution (int): Image side.
        seed (int): Seed; sample ``i`` depends only on ``(seed, i)``. Default: ``0``.
    """

    def __init__(self, num_samples: int, resolution: int, seed: int = 0):
        self.num_samples, self.resolution, self.seed = num_samples, resolution, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        names = list(COLOURS)
        colour = names[int(torch.randint(len(names), (1,), generator=rng))]
        r = self.resolution
        image = torch.full((3, r, r), -0.6)
        side = int(torch.randint(r // 4, r // 2 + 1, (1,), generator=rng))
        top, left = (int(v) for v in torch.randint(0, r - side + 1, (2,), generator=rng))
        image[:, top:top + side, left:left + side] = torch.tensor(COLOURS[colour]).view(3, 1, 1)
        return {'image': image, 'prompt': f'a {colour} square'}


@DATASETS.register('synthetic')
def build_synthetic_dataloader(batch_size: int, resolution: int, num_samples: int = 1024, seed: int = 0,
                               num_workers: int = 0) -> DataLoader:
    """Dataloader over :class:`SyntheticCaptionedImages` (``batch_size`` is per device; each rank its own slice);
    ``dataset.kind: synthetic``."""
    from composer.utils import dist

    dataset = SyntheticCaptionedImages(num_samples, resolution, seed)
    sampler = dist.get_sampler(dataset, shuffle=False, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers)
