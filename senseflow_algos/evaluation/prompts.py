"""Prompt files for evaluation: ``.txt`` (one per line), ``.json`` (a list, or COCO captions), ``.jsonl``, ``.csv``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

__all__ = ['load_prompts', 'PROMPT_KEYS']

#: Keys under which a prompt is found in JSON / JSONL / CSV records.
PROMPT_KEYS = ('prompt', 'caption', 'text')


def _from_record(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in PROMPT_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f'{where}: expected a string or a record with one of the keys {list(PROMPT_KEYS)}, got '
                     f'{str(record)[:80]!r}')


def load_prompts(path: str | Path, limit: Optional[int] = None) -> list[str]:
    """Read prompts, in file order.

    Args:
        path: ``.txt`` (one prompt per non-empty line), ``.json`` (a list of strings or records; or a COCO captions
            file, whose first caption per image is taken), ``.jsonl`` (a string or record per line) or ``.csv`` (a
            ``prompt`` / ``caption`` / ``text`` column).
        limit (int, optional): Keep the first ``limit`` prompts.

    Raises:
        FileNotFoundError, ValueError: Naming the file (and line) at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'prompt file {path} does not exist')
    suffix = path.suffix.lower()
    if suffix == '.txt':
        prompts = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    elif suffix == '.json':
        data = json.loads(path.read_text(encoding='utf-8'))
        if isinstance(data, dict) and 'annotations' in data:  # COCO captions: first caption of each image
            seen: dict[Any, str] = {}
            for ann in data['annotations']:
                seen.setdefault(ann.get('image_id'), _from_record(ann, f'{path} annotation {ann.get("id")}'))
            prompts = list(seen.values())
        elif isinstance(data, list):
            prompts = [_from_record(r, f'{path} item {i}') for i, r in enumerate(data)]
        else:
            raise ValueError(f'{path}: expected a JSON list of prompts or a COCO captions file')
    elif suffix == '.jsonl':
        prompts = [_from_record(json.loads(line), f'{path} line {i + 1}')
                   for i, line in enumerate(path.read_text(encoding='utf-8').splitlines()) if line.strip()]
    elif suffix == '.csv':
        with path.open(newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            key = next((k for k in PROMPT_KEYS if k in (reader.fieldnames or [])), None)
            if key is None:
                raise ValueError(f'{path}: no column named one of {list(PROMPT_KEYS)} (columns: {reader.fieldnames})')
            prompts = [row[key] for row in reader]
    else:
        raise ValueError(f'{path}: unsupported prompt file type {suffix!r}; use .txt, .json, .jsonl or .csv')
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f'{path} holds no prompts')
    return prompts[:limit] if limit else prompts
