"""Prompt list (a text file, one prompt a line, or a manifest column) -> prompt-only MDS dataset, for data-free DMD.

    python data_prep/prompts_to_mds.py --prompts prompts.txt --out /data/prompts-mds
    python data_prep/prompts_to_mds.py --prompts train.jsonl --column caption --out s3://bucket/prompts-mds

Train from it with ``dataset.kind=prompts`` (backward simulation only; algorithms that need real images, such as
the VFM discriminator, refuse it), or precompute its embeddings with ``data_prep/precompute.py`` and train with
``dataset.kind=precomputed`` without text encoders. Resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mds_writer import (
    PROMPT_COLUMNS,
    add_writer_args,
    manifest_records,
    prompt_file_records,
    prompt_sample,
    run_writer,
    simple_make_samples,
)

MANIFEST_SUFFIXES = ('.jsonl', '.ndjson', '.json', '.csv', '.tsv', '.parquet', '.pq')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Convert a prompt list to a prompt-only MDS dataset with columns caption and key (file:line or '
        'manifest:row). Empty prompts are bad records (see --on-bad).')
    parser.add_argument('--prompts', required=True,
                        help='A text file with one prompt per line, or a manifest (.jsonl, .csv, .tsv, .parquet) '
                        'with a prompt column (see --column).')
    parser.add_argument('--column', default=None,
                        help='Manifest column with the prompts (default: caption). Only for manifests; giving it '
                        'makes a file with another suffix be read as a manifest too.')
    add_writer_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.prompts)
    try:
        if args.column or path.suffix.lower() in MANIFEST_SUFFIXES:
            records = manifest_records(path, caption_column=args.column or 'caption', image_column=None)
        else:
            records = prompt_file_records(path)
    except (ImportError, KeyError, ValueError, FileNotFoundError) as e:
        print(f'error: {e.args[0] if isinstance(e, KeyError) else e}', file=sys.stderr)
        return 2
    state = {'tool': 'prompts_to_mds', 'prompts': str(path), 'column': args.column}
    run_writer(args, records, PROMPT_COLUMNS, simple_make_samples(prompt_sample), state, desc='prompts')
    return 0


if __name__ == '__main__':
    sys.exit(main())
