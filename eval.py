"""Evaluate a teacher and distilled students like the paper's Table 1.

    python eval.py --teacher <pipeline folder> --student <exported folder | checkpoint | run folder> \
        --prompts prompts.txt --out eval_out [--methods renoise,euler] [--batch-size 8] [--num 5000]

See ``python eval.py --help`` and ``senseflow_algos/evaluation/``.
"""

import sys

from senseflow_algos.evaluation.runner import main

if __name__ == '__main__':
    sys.exit(main())
