"""Export a trained student to a diffusers pipeline folder.

    python export.py <checkpoint .pt | run folder> <out folder> [--config yamls/x.yaml overrides...] [--method euler]

The run config rebuilds the frozen VAE and text encoders (checkpoints do not hold them); see
``senseflow_algos/export.py``.
"""

import sys

from senseflow_algos.export import main

if __name__ == '__main__':
    sys.exit(main())
