"""Results in the layout of the paper's Table 1: NFE | FID-T | Patch FID-T | CLIP | HPSv2 | Pick | ImageReward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

__all__ = ['COLUMNS', 'DIVERSITY_COLUMN', 'format_table', 'write_results']

#: ``(key, header, format)`` of each column, in the paper's order (Table 1 of SenseFlow).
COLUMNS = (
    ('nfe', 'NFE', '{:g}'),
    ('fid_t', 'FID-T ↓', '{:.2f}'),
    ('patch_fid_t', 'Patch FID-T ↓', '{:.2f}'),
    ('clip', 'CLIP ↑', '{:.4f}'),
    ('hpsv2', 'HPSv2 ↑', '{:.4f}'),
    ('pick', 'Pick ↑', '{:.2f}'),
    ('image_reward', 'ImageReward ↑', '{:.4f}'),
)

#: Added after :data:`COLUMNS` when a row has it (``eval.py --diversity-seeds``): within-prompt diversity as a ratio
#: to the teacher's (:mod:`senseflow_algos.evaluation.diversity`).
DIVERSITY_COLUMN = ('diversity', 'Diversity (x teacher)', '{:.3f}')

#: Columns a teacher row has no value for (they compare a student with the teacher).
TEACHER_DASH = ('fid_t', 'patch_fid_t')


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if row.get('role') == 'teacher' and key in TEACHER_DASH:
        return '--'
    value = row.get('metrics', {}).get(key) if key != 'nfe' else row.get('nfe')
    if value is None:
        return 'n/a'
    return fmt.format(round(value, 1) if key == 'nfe' else value)


def format_table(rows: list[dict[str, Any]], skipped: Optional[dict[str, str]] = None,
                 notes: Optional[list[str]] = None) -> str:
    """A markdown table, one row per method (``{'name', 'role', 'nfe', 'metrics': {key: value}}``), followed by the
    reason of every skipped metric and any notes."""
    columns = COLUMNS + ((DIVERSITY_COLUMN,) if any('diversity' in r.get('metrics', {}) for r in rows) else ())
    header = '| Method | ' + ' | '.join(h for _, h, _ in columns) + ' |'
    sep = '|---|' + '|'.join('---:' for _ in columns) + '|'
    lines = [header, sep]
    for row in rows:
        lines.append(f'| {row["name"]} | ' + ' | '.join(_cell(row, k, f) for k, _, f in columns) + ' |')
    extra = [f'- n/a {key}: {reason}' for key, reason in (skipped or {}).items()] + [f'- {n}' for n in notes or []]
    return '\n'.join(lines + ([''] + extra if extra else [])) + '\n'


def write_results(folder: str | Path, rows: list[dict[str, Any]], skipped: dict[str, str],
                  settings: dict[str, Any], notes: Optional[list[str]] = None) -> tuple[Path, Path]:
    """Write ``results.md`` (the table) and ``results.json`` (rows, skipped metrics, settings) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / 'results.md', folder / 'results.json'
    md.write_text(format_table(rows, skipped, notes))
    js.write_text(json.dumps({'columns': [k for k, _, _ in COLUMNS], 'rows': rows, 'skipped': skipped,
                              'notes': notes or [], 'settings': settings}, indent=2) + '\n')
    return md, js
