"""Entry point: ``composer train.py yamls/<name>.yaml [dotted.key=value ...]``.

The config is loaded, overridden and validated before torch, Composer or any model is imported, so a bad key
fails in about a second, naming the key.
"""

from __future__ import annotations

import sys
from typing import Sequence

from senseflow_algos.config import ConfigError, load_config, validate_config
from senseflow_algos.preflight import preflight

USAGE = 'usage: composer train.py yamls/<name>.yaml [dotted.key=value ...]'


def main(argv: Sequence[str] | None = None) -> int:
    """Load, validate, build and fit. Returns a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        validate_config(cfg, source=argv[0])
        preflight(cfg, source=argv[0])
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    from senseflow_algos.builders import build_trainer
    from senseflow_algos.checkpointing import CheckpointError

    try:
        trainer = build_trainer(cfg)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    trainer.fit()
    trainer.close()
    return 0
