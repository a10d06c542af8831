"""``python -m senseflow_algos.plan yamls/flux.yaml [dotted.overrides ...] --gpus 8 --gpu-memory 80GB``

Loads and validates the run config exactly as ``train.py`` does, builds every network on the meta device from the
architecture configs and prints the launch plan: parameters and FSDP units per network; weights, gradients, optimizer
state, activations (with and without checkpointing), FSDP transients and the peak per GPU; host RAM per node at
start-up; FLOPs per generator update and the time at a stated MFU; whether it fits and, if not, the smallest change
that does (each candidate planned in full). Exit code 0 if it fits, 1 if not, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from senseflow_algos.config import ConfigError, load_config, validate_config

USAGE = 'python -m senseflow_algos.plan yamls/<name>.yaml [dotted.key=value ...] [--gpus N] [--gpu-memory 80GB] ...'


def _parser() -> argparse.ArgumentParser:
    from senseflow_algos.plan.planner import PEAK_TFLOPS

    p = argparse.ArgumentParser(prog='python -m senseflow_algos.plan', usage=USAGE, description=__doc__.split('\n\n')[1])
    p.add_argument('config', help='run config (YAML)')
    p.add_argument('overrides', nargs='*', help='dotted.key=value overrides, as for train.py')
    p.add_argument('--gpus', type=int, default=8, help='GPUs in the run (default: 8)')
    p.add_argument('--gpu-memory', default='80GB', help='memory per GPU, e.g. 80GB, 141GB (default: 80GB)')
    p.add_argument('--gpus-per-node', type=int, default=8, help='GPUs per node (default: 8)')
    p.add_argument('--host-memory-per-node', default=None, help='host RAM per node, e.g. 2TB (checked if given)')
    p.add_argument('--gpu', default='H100', choices=sorted(PEAK_TFLOPS),
                   help='GPU kind: sets the dense bf16 peak (H100/H200 989, A100 312, B200 2250 TFLOP/s)')
    p.add_argument('--peak-tflops', type=float, default=None, help='dense bf16 peak per GPU (overrides --gpu)')
    p.add_argument('--mfu', type=float, default=0.26,
                   help='achieved fraction of the peak, on executed FLOPs (default 0.26: the reference FLUX run)')
    p.add_argument('--fsdp-version', type=int, choices=(1, 2), default=None,
                   help='Composer FSDP version (default: $FSDP_VERSION, 2 with cpu_offload, else 1)')
    p.add_argument('--reserve', default='2GB', help='per-GPU memory left for CUDA context, NCCL, fragmentation')
    p.add_argument('--no-fix', action='store_true', help='do not search for a change that fits')
    p.add_argument('--json', default=None, help='also write the plan as JSON to this file')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate_config(cfg, source=args.config)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    from senseflow_algos.plan.planner import PEAK_TFLOPS, Hardware, PlanCache, find_fix, parse_bytes, plan_run
    from senseflow_algos.plan.report import format_plan, plan_summary

    hardware = Hardware(gpus=args.gpus, gpu_memory=parse_bytes(args.gpu_memory), gpus_per_node=args.gpus_per_node,
                        host_memory_per_node=parse_bytes(args.host_memory_per_node) if args.host_memory_per_node
                        else None, peak_tflops=args.peak_tflops or PEAK_TFLOPS[args.gpu], mfu=args.mfu,
                        fsdp_version=args.fsdp_version, reserve=parse_bytes(args.reserve))
    cache = PlanCache()
    print(f'planning {args.config} on {args.gpus} GPU(s): building the networks on the meta device ...', flush=True)
    try:
        plan = plan_run(cfg, hardware, cache)
        if not plan.fits and not args.no_fix:
            find_fix(cfg, plan, cache, progress=lambda label: print(f'  planning candidate: {label}', flush=True))
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(format_plan(plan, args.config, tuple(args.overrides)))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'command': ' '.join(['python -m senseflow_algos.plan', *(argv or sys.argv[1:])]),
                       'plan': plan_summary(plan)}, f, indent=2, default=str)
    return 0 if plan.fits else 1


if __name__ == '__main__':
    sys.exit(main())
