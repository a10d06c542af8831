"""The training entry point: config validation before anything heavy is imported, the real ``composer`` launcher on
the tiny configs, and the ``from_pretrained`` path of the full-size configs on a saved tiny pipeline."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
YAMLS = REPO / 'yamls'

# Run configs: everything under yamls/ except the schema and the MCLI run specs (which launch these configs).
ALL_YAMLS = sorted(p for p in YAMLS.rglob('*.yaml')
                   if p.name != 'schema.yaml' and 'mcli' not in p.relative_to(YAMLS).parts)


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)


def test_typo_key_fails_fast_without_importing_a_model():
    code = (
        'import json, sys\n'
        'from senseflow_algos.train import main\n'
        "rc = main(['yamls/tiny_flux.yaml', 'model.gen_evry=3'])\n"
        "heavy = [m for m in ('senseflow_algos.models.dmd', 'senseflow_algos.builders', 'composer', 'torch', "
        "'diffusers') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n")
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {'rc': 2, 'heavy': []}
    assert 'model.gen_evry' in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('override,key', [
    ('model.gen_evry=3', 'model.gen_evry'),
    ('trainer.fsdp_config.sharding_strategy=FULL_SHARD', 'trainer.fsdp_config'),
    ('trainer.precision=amp_fp16', 'trainer.precision'),
    ('model.gen_every=0', 'model.gen_every'),
    ('trainer.max_duration=10', 'trainer.max_duration'),
])
def test_bad_config_rejected_naming_the_key(override, key, capsys):
    from senseflow_algos.train import main

    assert main([str(YAMLS / 'tiny_flux.yaml'), override]) == 2
    err = capsys.readouterr().err
    assert key in err
    assert err.startswith('error:')


def test_bad_cli_usage(capsys):
    from senseflow_algos.train import main

    assert main([]) == 2
    assert main([str(YAMLS / 'does_not_exist.yaml')]) == 2
    assert 'not found' in capsys.readouterr().err
    assert main([str(YAMLS / 'tiny_flux.yaml'), 'model.gen_every']) == 2  # no '='
    assert 'dotted.key=value' in capsys.readouterr().err


@pytest.mark.parametrize('path', ALL_YAMLS, ids=[str(p.relative_to(YAMLS)) for p in ALL_YAMLS])
def test_every_yaml_validates(path):
    from senseflow_algos.config import load_config, validate_config

    validate_config(load_config(path), source=str(path))


# SD 3.5 through the launcher in `make test-slow`; the in-process tests train tiny SD 3.5 too.
@pytest.mark.parametrize('yaml_name', ['tiny_flux', pytest.param('tiny_sd35', marks=pytest.mark.slow, id='tiny_sd35')])
def test_composer_launcher_trains_tiny_config(yaml_name, tmp_path):
    launcher = shutil.which('composer')
    assert launcher, 'the composer launcher is not on PATH'
    save = tmp_path / 'ckpt'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [launcher, 'train.py', f'yamls/{yaml_name}.yaml', 'trainer.max_duration=3ba', 'trainer.progress_bar=false',
         f'trainer.save_folder={save}'],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # It trained three batches: Composer saved the final checkpoint of batch 3.
    assert (save / 'ep0-ba3-rank0.pt').is_file(), sorted(os.listdir(save))


@pytest.mark.parametrize('yaml_name', ['tiny_flux', 'tiny_sd35'])
def test_tiny_config_losses_finite(make_trainer, yaml_name):
    trainer, rec = make_trainer(yaml_name, ['trainer.max_duration=3ba'])
    trainer.fit()
    trainer.close()
    assert len(rec.losses) == 3
    for losses in rec.losses:
        assert 'loss/train/total' in losses and 'loss/train/fake_score/flow_matching' in losses
        assert all(math.isfinite(v) for v in losses.values()), losses
    assert 'loss/train/generator/dmd' in rec.losses[0]  # batches_seen 0 is a generator batch


@pytest.mark.parametrize('family,yaml_name', [('flux', 'flux'), ('sd35', 'sd35_large')])
def test_full_config_from_pretrained_folder(family, yaml_name, tmp_path, make_trainer):
    """The real ``from_pretrained`` loading path of the production YAMLs, on a saved tiny pipeline."""
    from senseflow_algos.config import load_config
    from senseflow_algos.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(family, tmp_path / 'pipe')
    tiny_algorithms = load_config(YAMLS / f'tiny_{family}.yaml').get('algorithms') or {}

    def offline_discriminator(cfg):
        # The production VFM discriminator downloads pretrained DINOv2 weights: swap in the tiny config's
        # random-weight backbone, keep everything else of the production config.
        vfm = (cfg.get('algorithms') or {}).get('vfm_discriminator')
        if vfm is not None:
            tiny = dict(tiny_algorithms['vfm_discriminator'])
            tiny.pop('generator_weight', None)
            vfm.update(tiny)

    trainer, rec = make_trainer(yaml_name, edit=offline_discriminator, overrides=[
        f'model.pretrained={folder}', 'model.resolution=32', 'model.dtype=fp32', 'model.teacher_dtype=fp32',
        'trainer.precision=fp32', 'trainer.device=cpu', 'trainer.max_duration=3ba', 'trainer.autoresume=false', 'trainer.parallelism_config=null',
        'dataset.global_batch_size=2', 'dataset.kind=synthetic', 'dataset.num_samples=64',
        f'trainer.save_folder={tmp_path / "ckpt"}',
        # Every batch a generator batch, and an lr large enough that the generator visibly moves even inside
        # the SD 3.5 configs' 500-batch linear warmup (under which Composer gives batches 1 and 2 lr 0).
        'model.gen_every=1', 'optimizer.lr=1.0e-3'
    ])
    model = trainer.state.model
    assert model.family.name == family
    if family == 'flux':
        assert model.teacher.config.guidance_embeds is True
        assert model.generator.config.guidance_embeds is False
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    gen_before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    trainer.fit()
    trainer.close()
    assert len(rec.losses) == 3
    assert all(math.isfinite(v) for losses in rec.losses for v in losses.values())
    assert all('loss/train/generator/dmd' in losses for losses in rec.losses)
    teacher_after = model.teacher.state_dict()
    assert all(teacher_before[k].equal(v) for k, v in teacher_after.items())
    assert any(not gen_before[k].equal(v) for k, v in model.generator.state_dict().items())
    assert (tmp_path / 'ckpt' / 'ep0-ba3-rank0.pt').is_file()
