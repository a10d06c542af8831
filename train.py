"""Train a SenseFlow / DMD student: ``composer train.py yamls/<name>.yaml [dotted.key=value ...]``."""

import sys

from senseflow_algos.train import main

if __name__ == '__main__':
    sys.exit(main())
