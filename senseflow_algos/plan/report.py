"""The plan as text (the CLI's output) and as rows of the README's "what fits where" table.

Every number says how it was obtained: [exact] follows torch's FSDP allocation rules (validated against a 2-process
run), [measured] comes from the real modules run on meta tensors, [modelled] is a stated rule of thumb.
"""

from __future__ import annotations

from typing import Any

from senseflow_algos.plan.networks import dtype_name
from senseflow_algos.plan.planner import GiB, Plan

__all__ = ['format_plan', 'gib', 'table_row', 'TABLE_HEADER', 'plan_summary']


def gib(n: float) -> str:
    return f'{n / GiB:.1f} GiB'


def _count(n: int) -> str:
    if n >= 1e9:
        return f'{n / 1e9:.2f} B'
    if n >= 1e6:
        return f'{n / 1e6:.1f} M'
    return f'{n / 1e3:.1f} k' if n else '0'


def _sharding_text(plan: Plan) -> str:
    s = plan.sharding
    if s is None:
        return 'no FSDP (DDP)' if plan.hardware.gpus > 1 else 'one device, no FSDP'
    text = f'FSDP{s.version} {s.strategy}, shards over {s.shard_degree} of {s.world} ranks'
    if s.param_dtype is not None:
        text += f', mixed precision ({dtype_name(s.param_dtype)} compute)'
    return text + (', CPU offload' if s.offload else '')


def format_plan(plan: Plan, source: str = 'config', overrides: tuple[str, ...] = ()) -> str:
    """The plan as the CLI prints it."""
    s, hw, gpu = plan.settings, plan.hardware, plan.gpu
    lines = [f'Plan for {source}{" " + " ".join(overrides) if overrides else ""}',
             f'  {hw.gpus} GPU(s) x {gib(hw.gpu_memory)} ({hw.gpus_per_node} per node), {_sharding_text(plan)}; '
             f'precision {s.precision}',
             f'  micro-batch {plan.micro_batch} per GPU x {plan.micro_batches} (global batch {s.global_batch_size}), '
             f'TTUR gen_every={s.gen_every}, {s.resolution} px',
             '  [exact]: torch 2.7\'s FSDP allocation rules (checked per rank against a 2-process run); [measured]: the '
             'project\'s modules run on meta tensors; [modelled]: a stated rule, see Notes',
             '', 'Networks (built on the meta device from the architecture configs)',
             f'  {"network":<28}{"class":<32}{"trainable":>11}{"frozen":>11}  {"dtype (compute)":<18}'
             f'{"FSDP units":<20}{"per GPU":>10}']
    for r in plan.networks:
        lines.append(f'  {r.name:<28}{r.kind:<32}{_count(r.trainable):>11}{_count(r.frozen):>11}  '
                     f'{r.dtype + " (" + r.compute_dtype + ")":<18}{r.units:<20}{gib(r.per_gpu):>10}')
    phases = gpu.phases
    g, c = phases['generator'], phases['critic']
    ckpt = ', '.join(plan.checkpointed) or 'nothing'
    lines += ['', 'Per GPU (rank 0)                                    generator phase   critic phase',
              f'  weights: local shards + replicated networks       {gib(gpu.weights):>15}   {"(same)":>12}   [exact]',
              f'  optimizer state (AdamW moments)                   {gib(gpu.optimizer):>15}   {"(same)":>12}   '
              '[exact]',
              f'  gradients                                         {gib(g.grads):>15}   {gib(c.grads):>12}   [exact]',
              f'  activations as configured                         {gib(g.activations):>15}   '
              f'{gib(c.activations):>12}   [measured]',
              f'    (checkpointed: {ckpt})',
              f'    without any checkpointing                       {gib(g.activations_no_checkpointing):>15}   '
              f'{gib(c.activations_no_checkpointing):>12}   [measured]',
              f'    with all checkpointing (G, F, VAE dec., VFM)    {gib(g.activations_all_checkpointing):>15}   '
              f'{gib(c.activations_all_checkpointing):>12}   [measured]',
              f'  FSDP transients (gathered units, unsharded grads) {gib(g.transient):>15}   {gib(c.transient):>12}   '
              '[modelled]',
              f'  peak                                              {gib(_phase_peak(plan, "generator")):>15}   '
              f'{gib(_phase_peak(plan, "critic")):>12}',
              f'  => peak {gib(plan.peak)} of {gib(hw.gpu_memory - hw.reserve)} usable ({gib(hw.gpu_memory)} minus '
              f'{gib(hw.reserve)} for the CUDA context, NCCL and allocator slack)']
    host = plan.host
    lines += ['', 'Host RAM per node at start-up [modelled upper bound]',
              f'  lean start (global rank 0 alone loads teacher, generator, fake score: {gib(host.transformers)}): '
              f'node 0 {gib(host.lean_node0)}, other nodes {gib(host.lean_other_nodes)}'
              f'{"   <- this run" if host.lean_applies else ""}',
              f'  old start (every rank loads all three):  {gib(host.old_per_node)} per node'
              f'{"" if host.lean_applies else "   <- this run"}',
              f'  per rank, loaded by every rank (VAE, text encoders, VFM backbone and heads): '
              f'{gib(host.per_rank_replicated)}']
    if host.export:
        lines.append(f'  export (python export.py, one process): generator + VAE + text encoders {gib(host.export)} '
                     f'(rebuilding the whole model: {gib(host.export_whole_model)})')
    if host.offload_training_per_node:
        lines.append(f'  CPU offload while training: {gib(host.offload_training_per_node)} per node (sharded '
                     'parameters, gradients, Adam state; pinned)')
    lines += _flops_lines(plan)
    lines += ['', _verdict(plan)]
    if plan.candidates:
        lines.append('  candidates planned (peak per GPU):')
        for fix in plan.candidates:
            mark = 'fits' if fix.plan.fits else 'does not fit'
            host = fix.plan.host.offload_training_per_node
            lines.append(f'    {fix.label}: {gib(fix.plan.peak)} ({mark})' +
                         (f'; host RAM for the offloaded state {gib(host)} per node' if host else ''))
    notes = plan.notes + plan.host.notes + _not_modelled()
    lines += ['', 'Notes'] + [f'  - {n}' for n in notes]
    return '\n'.join(lines)


def _phase_peak(plan: Plan, phase: str) -> int:
    p = plan.gpu.phases[phase]
    return plan.gpu.weights + plan.gpu.optimizer + p.grads + p.activations + p.transient


def _flops_lines(plan: Plan) -> list[str]:
    s, hw, fl = plan.settings, plan.hardware, plan.flops
    scale = plan.micro_batches * hw.gpus
    lines = ['', f'FLOPs per generator update (= {s.gen_every} batches of {s.global_batch_size}) [measured on meta per '
             'pass; pass counts from the training loop, backward simulation at its expected anchor]',
             f'  {"network":<22}{"forwards":>10}{"backwards":>11}{"TFLOP":>12}{"recompute":>11}']
    for name, (f, b) in fl.passes.counts.items():
        lines.append(f'  {name:<22}{f:>10.2f}{b:>11.2f}{fl.model[name] * scale / 1e12:>12.1f}'
                     f'{fl.recompute.get(name, 0) * scale / 1e12:>11.1f}')
    lines += [f'  total: {plan.flops_per_update / 1e15:.2f} PFLOP model, {plan.executed_flops_per_update / 1e15:.2f} '
              'PFLOP executed (with checkpointing recomputation); attention counted as flash attention does (backward '
              'recomputes the scores)',
              f'Time at {hw.mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s per GPU (executed FLOPs) [modelled]: '
              f'{plan.seconds_per_update:.1f} s per generator update, {plan.seconds_per_batch:.2f} s per batch'
              + (f'; {s.max_duration} -> {plan.hours:.1f} h' if plan.hours is not None else '')]
    return lines


def _verdict(plan: Plan) -> str:
    if plan.fits:
        return f'Verdict: fits ({gib(plan.peak)} peak per GPU)'
    reasons = list(plan.problems)
    hw = plan.hardware
    if plan.peak > hw.gpu_memory - hw.reserve:
        reasons.append(f'peak {gib(plan.peak)} per GPU > {gib(hw.gpu_memory - hw.reserve)} usable')
    if hw.host_memory_per_node is not None and plan.host_startup > hw.host_memory_per_node:
        reasons.append(f'host RAM at start-up {gib(plan.host_startup)} > {gib(hw.host_memory_per_node)} per node')
    text = 'Verdict: does not fit: ' + '; '.join(reasons)
    if plan.fix is not None:
        fix = plan.fix
        change = ' '.join(fix.overrides) + (f' --gpus {fix.gpus}' if fix.gpus else '')
        text += f'\n  smallest change that fits: {fix.label} ({gib(fix.plan.peak)} peak)\n    {change}'
    elif plan.candidates:
        text += '\n  no single change, pair of changes or GPU count up to the limit fits'
    return text


def _not_modelled() -> list[str]:
    return ['not modelled: the CUDA caching allocator\'s fragmentation, DiffAugment and loss temporaries, working '
            'memory of forwards without gradient (teacher, ISG, backward simulation), dataloader workers']


TABLE_HEADER = ('| model | GPUs | option | trainable | weights | grads | Adam | activations | peak / GPU | '
                'host RAM at start-up (lean / old) | s / batch | fits 80 GB |\n'
                '|---|---|---|---|---|---|---|---|---|---|---|---|')


def table_row(model: str, option: str, plan: Plan) -> str:
    """One row of the README's "what fits where" table."""
    gpu = plan.gpu
    worst = gpu.phases[gpu.worst_phase()]
    trainable = sum(r.trainable for r in plan.networks)
    host = (f'{plan.host.lean_node0 / GiB:.0f} / {plan.host.old_per_node / GiB:.0f} GiB' if plan.host.lean_applies
            else f'{plan.host.old_per_node / GiB:.0f} GiB (old start)')
    fits = 'yes' if plan.fits else 'no'
    return (f'| {model} | {plan.hardware.gpus} | {option} | {_count(trainable)} | {gpu.weights / GiB:.1f} | '
            f'{worst.grads / GiB:.1f} | {gpu.optimizer / GiB:.1f} | {worst.activations / GiB:.1f} | '
            f'**{plan.peak / GiB:.1f} GiB** | {host} | {plan.seconds_per_batch:.1f} | {fits} |')


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan's numbers as JSON-ready data (bytes, FLOPs, seconds)."""
    gpu = plan.gpu
    return {
        'gpus': plan.hardware.gpus, 'gpu_memory': plan.hardware.gpu_memory,
        'sharding': None if plan.sharding is None else {
            'version': plan.sharding.version, 'strategy': plan.sharding.strategy,
            'shard_degree': plan.sharding.shard_degree, 'offload': plan.sharding.offload},
        'micro_batch': plan.micro_batch,
        'networks': [vars(r) for r in plan.networks],
        'per_gpu': {'weights': gpu.weights, 'optimizer': gpu.optimizer, 'peak': plan.peak,
                    'phases': {k: vars(v) for k, v in gpu.phases.items()}},
        'host_startup': {'lean_node0': plan.host.lean_node0, 'lean_other_nodes': plan.host.lean_other_nodes,
                         'old_per_node': plan.host.old_per_node, 'lean_applies': plan.host.lean_applies,
                         'offload_training_per_node': plan.host.offload_training_per_node},
        'flops_per_update': plan.flops_per_update, 'executed_flops_per_update': plan.executed_flops_per_update,
        'seconds_per_update': plan.seconds_per_update, 'seconds_per_batch': plan.seconds_per_batch,
        'hours': plan.hours, 'fits': plan.fits, 'problems': plan.problems,
        'fix': None if plan.fix is None else {'label': plan.fix.label, 'overrides': plan.fix.overrides,
                                              'gpus': plan.fix.gpus, 'peak': plan.fix.plan.peak},
    }
