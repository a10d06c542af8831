"""Write a folder of small captioned example images (PNG + same-named .txt), to try the data pipeline offline.

    python data_prep/example_images.py --out runs/data/example-images --num 64

The images are the deterministic coloured squares of the synthetic dataset (``a red square``, ...), whose words
the tiny models' tokenizers know.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Write NUM captioned example images (000000.png + 000000.txt, ...) '
                                     'to a folder, the input data_prep/images_to_mds.py expects.')
    parser.add_argument('--out', required=True, help='Output folder (created if needed).')
    parser.add_argument('--num', type=int, default=64, help='Number of images (default: %(default)s).')
    parser.add_argument('--size', type=int, default=48, help='Image side in pixels (default: %(default)s).')
    parser.add_argument('--seed', type=int, default=0, help='Seed of the images and captions (default: %(default)s).')
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def write_example_images(out: str | Path, num: int, size: int = 48, seed: int = 0) -> list[Path]:
    """Write the images and captions; returns the image paths."""
    from PIL import Image

    from senseflow_algos.data.synthetic import SyntheticCaptionedImages

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = SyntheticCaptionedImages(num, size, seed=seed)
    paths = []
    for i in range(num):
        sample = data[i]
        pixels = ((sample['image'].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        path = out / f'{i:06d}.png'
        Image.fromarray(pixels).save(path)
        path.with_suffix('.txt').write_text(sample['prompt'], encoding='utf-8')
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    write_example_images(args.out, args.num, args.size, args.seed)
    print(f'{args.out}: {args.num} images with captions')
    return 0


if __name__ == '__main__':
    sys.exit(main())
