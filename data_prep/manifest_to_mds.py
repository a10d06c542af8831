"""Manifest (JSONL, CSV/TSV or Parquet) of image path + caption -> MDS dataset (image bytes as read, caption, size).

    python data_prep/manifest_to_mds.py --manifest /data/train.jsonl --out /data/train-mds
    python data_prep/manifest_to_mds.py --manifest train.csv --image-column path --caption-column text --out gs://b/t

Relative image paths are resolved against the manifest's folder (or ``--image-root``). Parquet needs ``pyarrow``
(or ``pandas`` with a Parquet engine). Resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mds_writer import (
    IMAGE_COLUMNS,
    add_writer_args,
    image_sample,
    manifest_records,
    run_writer,
    simple_make_samples,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Convert a manifest of image paths and captions (one row per image) to an MDS dataset with '
        'columns image (the file bytes, lossless), caption, width, height and key (manifest name:row).')
    parser.add_argument('--manifest', required=True,
                        help='The manifest: .jsonl (one JSON object per line), .csv, .tsv or .parquet.')
    parser.add_argument('--image-column', default='image', help='Column with the image path (default: %(default)s).')
    parser.add_argument('--caption-column', default='caption', help='Column with the caption (default: %(default)s).')
    parser.add_argument('--image-root', default=None,
                        help="Folder relative image paths are resolved against (default: the manifest's folder).")
    add_writer_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = manifest_records(args.manifest, caption_column=args.caption_column, image_column=args.image_column,
                                   image_root=args.image_root)
    except (ImportError, KeyError, ValueError, FileNotFoundError) as e:
        print(f'error: {e.args[0] if isinstance(e, KeyError) else e}', file=sys.stderr)
        return 2
    state = {'tool': 'manifest_to_mds', 'manifest': str(args.manifest), 'image_root': args.image_root}
    run_writer(args, records, IMAGE_COLUMNS, simple_make_samples(image_sample), state, desc='images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
