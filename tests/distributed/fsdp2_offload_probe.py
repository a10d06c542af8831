"""``train.py`` under FSDP2 with a callback that prints, after every batch's optimizer step, where FSDP2 keeps the
trained state (:func:`senseflow_algos.models.offload_report.offload_report`), one ``OFFLOAD_REPORT <json>`` line per
rank and batch; for tests/distributed/test_fsdp_training.py. Nothing else changes.

    python -m composer.cli.launcher -n 2 tests/distributed/fsdp2_offload_probe.py yamls/tiny_flux.yaml ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from composer.core import Callback  # noqa: E402
from composer.utils import dist  # noqa: E402

import senseflow_algos.builders as builders  # noqa: E402
from senseflow_algos.models.offload_report import offload_report  # noqa: E402
from senseflow_algos.train import main  # noqa: E402


class OffloadProbe(Callback):

    def batch_end(self, state, logger):
        report = offload_report(state.model, state.optimizers[0])
        print(f'OFFLOAD_REPORT {json.dumps({"rank": dist.get_global_rank(), **report})}', flush=True)


_build_trainer = builders.build_trainer


def build_trainer_with_probe(cfg):
    trainer = _build_trainer(cfg)
    trainer.state.callbacks.append(OffloadProbe())
    return trainer


builders.build_trainer = build_trainer_with_probe

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
