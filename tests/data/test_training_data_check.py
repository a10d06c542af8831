"""The training-data check: a Streaming kind reads an MDS dataset that exists (``index.json``), named by
``dataset.remote``, ``dataset.local`` or ``dataset.streams``; synthetic data is asked for by name."""

from __future__ import annotations

import pytest

from senseflow_algos.checks.training_data import check_training_data
from senseflow_algos.config import ConfigError


def _cfg(tiny: bool = False, **dataset):
    return {'model': {'family': 'flux', 'tiny': tiny}, 'dataset': {'global_batch_size': 2, **dataset}}


def test_a_real_mds_dataset_passes_as_remote_local_or_stream(image_mds):
    check_training_data(_cfg(kind='image_caption', remote=str(image_mds)), 'x.yaml')
    check_training_data(_cfg(kind='image_caption', local=str(image_mds)), 'x.yaml')
    check_training_data(_cfg(kind='precomputed', streams=[{'remote': str(image_mds), 'proportion': 1.0}]), 'x.yaml')
    # An object-store URI is Streaming's to download; a missing cache folder for it is fine.
    check_training_data(_cfg(kind='image_caption', remote='s3://bucket/mds', local='/tmp/not-yet'), 'x.yaml')


@pytest.mark.parametrize('kind,command', [('image_caption', 'images_to_mds.py'), ('precomputed', 'precompute.py'),
                                          ('prompts', 'prompts_to_mds.py')])
def test_no_dataset_names_remote_and_the_command_that_makes_one(kind, command):
    with pytest.raises(ConfigError, match='dataset.remote is not set') as e:
        check_training_data(_cfg(kind=kind), 'yamls/flux.yaml')
    assert f'data_prep/{command}' in str(e.value) and 'yamls/flux.yaml dataset.remote=' in str(e.value)


def test_bad_local_datasets_are_named(image_mds, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.remote='.*missing'.*does not exist"):
        check_training_data(_cfg(kind='image_caption', remote=str(tmp_path / 'missing')), 'x.yaml')
    with pytest.raises(ConfigError, match='has no index.json'):
        check_training_data(_cfg(kind='image_caption', remote=str(tmp_path)), 'x.yaml')
    with pytest.raises(ConfigError, match=r'dataset.streams\[1\].local'):
        check_training_data(_cfg(kind='image_caption', streams=[{'remote': str(image_mds)},
                                                                {'local': str(tmp_path)}]), 'x.yaml')
    with pytest.raises(ConfigError, match=r'dataset.streams\[0\] has neither remote nor local'):
        check_training_data(_cfg(kind='image_caption', streams=[{'proportion': 1.0}]), 'x.yaml')
    with pytest.raises(ConfigError, match=r'images/train does not exist'):  # the split is a sub-folder
        check_training_data(_cfg(kind='image_caption', remote=str(image_mds), split='train'), 'x.yaml')


def test_synthetic_data_with_a_real_teacher_is_announced(capsys):
    check_training_data(_cfg(kind='synthetic', tiny=True), 'tiny.yaml')
    assert capsys.readouterr().err == ''
    check_training_data(_cfg(kind='synthetic'), 'flux.yaml')
    assert 'coloured squares, not on real data' in capsys.readouterr().err
