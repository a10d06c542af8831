"""Preflight through the real entry point: a production config without a dataset, a run file with placeholders, a
teacher that cannot be found: each stops before torch, Composer or a model is imported, naming the key."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ['flux', 'sd35_large', 'sd35_medium']
RUN_FILES = sorted((REPO / 'yamls' / 'mcli').glob('*.yaml'))
HEAVY = ('torch', 'composer', 'diffusers', 'transformers', 'senseflow_algos.builders')


def _main_in_fresh_python(args: list[str], env: dict | None = None) -> tuple[dict, str]:
    """Run ``senseflow_algos.train.main(args)`` in a new interpreter; return its exit code, heavy imports, stderr."""
    code = ('import json, sys\n'
            'from senseflow_algos.train import main\n'
            f'rc = main({args!r})\n'
            f'print(json.dumps({{"rc": rc, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize('name', PRODUCTION)
def test_production_config_without_dataset_stops_naming_remote_and_data_prep(name):
    result, err = _main_in_fresh_python([f'yamls/{name}.yaml'])
    assert result == {'rc': 2, 'heavy': []}
    assert err.startswith('error:') and 'dataset.remote is not set' in err
    assert 'data_prep/images_to_mds.py' in err and f'yamls/{name}.yaml dataset.remote=' in err
    assert 'Traceback' not in err


def test_train_py_script_stops_with_exit_code_2():
    proc = subprocess.run([sys.executable, 'train.py', 'yamls/flux.yaml'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and 'dataset.remote' in proc.stderr


def test_precomputed_kind_names_the_precompute_step():
    result, err = _main_in_fresh_python(['yamls/flux.yaml', 'dataset.kind=precomputed'])
    assert result['rc'] == 2 and 'data_prep/precompute.py' in err


@pytest.mark.parametrize('path', RUN_FILES, ids=lambda p: p.stem)
def test_run_file_as_shipped_names_every_placeholder(path):
    from mcli import RunConfig

    words = shlex.split(RunConfig.from_file(str(path)).command.replace('\\\n', ' '))
    start = words.index('composer')
    result, err = _main_in_fresh_python(words[start + 2:])
    assert result == {'rc': 2, 'heavy': []}
    assert 'replace the placeholders' in err
    assert "dataset.remote='s3://<bucket>/" in err and "trainer.save_folder='s3://<bucket>/" in err


def test_tiny_and_shapes_configs_pass_preflight():
    from senseflow_algos.config import load_config, validate_config
    from senseflow_algos.preflight import preflight

    for name in ('tiny_flux', 'tiny_sd35', 'shapes'):
        cfg = load_config(REPO / 'yamls' / f'{name}.yaml')
        validate_config(cfg)
        preflight(cfg, name)  # the shapes teacher is a pipeline folder in the repository
