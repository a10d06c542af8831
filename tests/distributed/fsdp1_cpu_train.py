"""``train.py`` under Composer's own FSDP1 on CPU processes (gloo), for tests/distributed/test_fsdp_training.py.

Composer 0.32.1 hands FSDP1 ``device_id=torch.cuda.current_device()``; torch's FSDP1 itself shards on the CPU too, so
here that call answers the CPU and this project's FSDP device is the CPU. Nothing else changes: the wrapping, the
per-network gradient clipping, the sharded checkpoints and the resume are Composer's and this project's FSDP1 code.

    python -m composer.cli.launcher -n 2 tests/distributed/fsdp1_cpu_train.py yamls/tiny_flux.yaml ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import senseflow_algos.builders as builders  # noqa: E402
from senseflow_algos.train import main  # noqa: E402

torch.cuda.current_device = lambda: torch.device('cpu')
builders.fsdp_device = lambda: torch.device('cpu')

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
