"""The MCLI run files parse as mcli RunConfigs with no unknown field, and the training command they run
(config + overrides) validates against the run schema."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path

import pytest
from mcli import RunConfig

from senseflow_algos.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = sorted((REPO / 'yamls' / 'mcli').glob('*.yaml'))


def test_run_files_for_flux_and_sd35_at_8_and_64_gpus():
    names = {p.stem for p in RUN_FILES}
    assert {'flux-8gpu', 'flux-64gpu', 'sd35-large-8gpu', 'sd35-large-64gpu'} <= names


@pytest.mark.parametrize('path', RUN_FILES, ids=lambda p: p.stem)
def test_run_file_is_valid(path):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # mcli warns on unknown fields
        run = RunConfig.from_file(str(path))
    assert run.name == path.stem and run.image.startswith('mosaicml/pytorch:2.7.0')
    gpus = run.compute['gpus']
    assert gpus in (8, 64) and str(gpus) in path.stem
    assert run.scheduling['resumable'] is True
    repo = [i for i in run.integrations if i['integration_type'] == 'git_repo']
    assert len(repo) == 1 and repo[0]['pip_install'].startswith('-e .')

    # The command: cd into the clone, then `composer train.py <config> key=value ...`.
    words = shlex.split(run.command.replace('\\\n', ' '))
    start = words.index('composer')
    assert words[start + 1] == 'train.py'
    config, overrides = words[start + 2], words[start + 3:]
    cfg = load_config(REPO / config, overrides)
    validate_config(cfg, f'{path.name}: {config}')
    assert cfg['trainer']['autoresume'] is True and cfg['run_name'] == path.stem
    assert cfg['trainer']['save_folder'].startswith('s3://')
    assert cfg['dataset']['global_batch_size'] == gpus  # batch 1 per GPU, as in the paper
