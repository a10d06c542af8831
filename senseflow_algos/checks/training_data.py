"""Training data must be named: a Streaming dataset kind without ``dataset.remote``, ``local`` or ``streams`` stops.

Production configs (FLUX, SD 3.5) train from MosaicML Streaming (MDS) datasets made by ``data_prep/``; the built-in
synthetic squares are for the tiny configs only and have to be asked for by name (``dataset.kind: synthetic``).
"""

from __future__ import annotations

import sys
import urllib.parse
from pathlib import Path
from typing import Any, Optional

from senseflow_algos.config import ConfigError

__all__ = ['STREAMING_KINDS', 'check_training_data', 'how_to_make_a_dataset', 'precompute_refusal']

#: ``dataset.kind`` values that read MDS datasets through Streaming.
STREAMING_KINDS = ('image_caption', 'precomputed', 'prompts')


def how_to_make_a_dataset(kind: str, config: str) -> str:
    """The ``data_prep/`` commands that make a dataset of ``kind`` and the training command that uses it."""
    if kind == 'prompts':
        make = ('  python data_prep/prompts_to_mds.py --prompts <prompts.txt, one a line> --out <folder or s3://...>\n')
    else:
        make = ('  python data_prep/images_to_mds.py --images <folder of images + same-named .txt captions> '
                '--out <folder or s3://...>\n'
                '  (or python data_prep/manifest_to_mds.py --manifest <JSONL/CSV/Parquet of image path + caption> '
                '--out ...)\n')
    if kind == 'precomputed':
        make += ('  python data_prep/precompute.py --input <that MDS> --out <folder or s3://...> --family <family> '
                 '--pretrained <teacher> --resolution <model.resolution>\n')
    return (f'Make one with data_prep/ (each command has --help):\n{make}'
            f'then pass it: composer train.py {config} dataset.remote=<folder or s3://...> '
            '(several datasets: dataset.streams=[{remote: ..., proportion: ...}, ...]). '
            'The README section "Data" walks through it.')


def _local_dataset_problem(path: str, split: Optional[str]) -> Optional[str]:
    """Why a local MDS folder cannot be read (missing, or no ``index.json``), else ``None``."""
    if urllib.parse.urlparse(path).scheme not in ('', 'file'):
        return None  # object store: Streaming reports a missing index when it downloads it
    root = Path(path).expanduser() / (split or '')
    if not root.exists():
        return f'{root} does not exist'
    if not (root / 'index.json').is_file():
        return f'{root} has no index.json (not an MDS dataset written by data_prep/ or streaming.MDSWriter)'
    return None


def precompute_refusal(family_name: Optional[str]) -> Optional[str]:
    """Why ``model.family`` cannot train on precomputed conditioning (``None`` when it can, or is unknown here): the one
    wording of the rule for the config check, ``data_prep/precompute.py`` and the planner's table."""
    from senseflow_algos.models.families import FAMILIES

    family = FAMILIES.get(family_name)
    if family is None or family.precomputable_conditioning:
        return None
    return ('its prompt embeddings have a length per prompt (with a mask), which data_prep/precompute.py does not '
            'store yet; train with dataset.kind=image_caption (encoded online)')


def check_training_data(cfg: dict[str, Any], source: str) -> None:
    """A Streaming dataset kind needs ``dataset.remote`` (or ``local``, or ``streams``) pointing at an MDS dataset.

    Raises:
        ConfigError: Naming ``dataset.remote`` and the ``data_prep/`` commands that make a dataset, or naming the
            local folder that is missing or holds no ``index.json``.
    """
    dataset, model = cfg['dataset'], cfg['model']
    kind = dataset['kind']
    if kind not in STREAMING_KINDS:
        if kind == 'synthetic' and not model.get('tiny'):
            print(f'warning: {source}: dataset.kind=synthetic trains on the built-in coloured squares, not on real '
                  'data (meant for the tiny test configs)', file=sys.stderr)
        return
    refusal = precompute_refusal(model.get('family')) if kind == 'precomputed' else None
    if refusal:
        raise ConfigError(f'{source}: dataset.kind=precomputed cannot train model.family={model["family"]}: {refusal}')
    streams = dataset.get('streams') or []
    if not streams and not dataset.get('remote') and not dataset.get('local'):
        raise ConfigError(f'{source}: dataset.remote is not set. dataset.kind={kind} trains from a MosaicML Streaming '
                          f'(MDS) dataset and none was given.\n{how_to_make_a_dataset(kind, source)}')
    specs = [(f'dataset.streams[{i}]', s) for i, s in enumerate(streams)] or [('dataset', dataset)]
    for key, spec in specs:
        remote, local = spec.get('remote'), spec.get('local')
        if not remote and not local:
            raise ConfigError(f'{source}: {key} has neither remote nor local: name the MDS dataset it reads')
        # A local remote is read in place; a local cache alone must already hold the dataset.
        path, name = (remote, f'{key}.remote') if remote else (local, f'{key}.local')
        problem = _local_dataset_problem(path, spec.get('split') or dataset.get('split'))
        if problem:
            raise ConfigError(f'{source}: {name}={path!r}: {problem}.\n{how_to_make_a_dataset(kind, source)}')
