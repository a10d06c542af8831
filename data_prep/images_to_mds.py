"""Folder of images with same-named ``.txt`` captions -> MDS dataset (image bytes as read, caption, size).

    python data_prep/images_to_mds.py --images /data/photos --out /data/photos-mds
    python data_prep/images_to_mds.py --images /data/photos --out s3://bucket/photos-mds --on-bad skip

``cat.jpg`` is captioned by ``cat.txt`` next to it. Resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mds_writer import (
    IMAGE_COLUMNS,
    IMAGE_EXTENSIONS,
    add_writer_args,
    folder_records,
    image_sample,
    run_writer,
    simple_make_samples,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Convert a folder of images, each with a same-named .txt caption file, to an MDS dataset with '
        'columns image (the file bytes, lossless), caption, width, height and key (relative path). Train from it '
        'with dataset.kind=image_caption, or add embeddings and latents with data_prep/precompute.py.')
    parser.add_argument('--images', required=True, help='Folder with the images and their .txt captions.')
    parser.add_argument('--no-recursive', action='store_true', help='Only the top folder, not its sub-folders.')
    parser.add_argument('--extensions', default=','.join(IMAGE_EXTENSIONS),
                        help='Comma-separated image suffixes, case-insensitive (default: %(default)s).')
    add_writer_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    extensions = tuple(e.strip() if e.strip().startswith('.') else f'.{e.strip()}' for e in args.extensions.split(','))
    records = folder_records(args.images, recursive=not args.no_recursive, extensions=extensions)
    if not records:
        print(f'error: no images with suffixes {extensions} in {args.images}', file=sys.stderr)
        return 2
    state = {'tool': 'images_to_mds', 'images': str(args.images)}
    run_writer(args, records, IMAGE_COLUMNS, simple_make_samples(image_sample), state, desc='images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
