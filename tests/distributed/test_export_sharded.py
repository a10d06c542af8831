"""Export from sharded checkpoints: a 2-process gloo run under FSDP2 and one under FSDP1 write sharded checkpoints
(``state_dict_type: sharded``) and, through the ``export_pipeline`` callback, a pipeline gathered to rank 0.
``export.py <run folder>`` reads the generator from the shards; its pipeline gives the same images as the same weights
exported from an unsharded checkpoint (torch's own ``dcp_to_torch_save`` of the folder), and the callback's pipeline
loads and holds the final weights. An export from an object store (a local moto S3 server) works end to end: Composer
uploads a training run's checkpoints there, ``save_run_config`` its run config, and ``export.py s3://...`` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from senseflow_algos.export import BARE_WEIGHTS, main, pipeline_call_kwargs
from senseflow_algos.sampling import seeded_default_rng
from tests.distributed.conftest import BATCHES

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ['a red circle above a blue square', 'a small green star']
ATOL = 1e-6  # measured: 0 (the same weights, the same code)
LAST = f'ep0-ba{BATCHES}'  # the shared run's final checkpoint


def _images(folder: Path) -> torch.Tensor:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt', **pipeline_call_kwargs(folder)).images


def _bare(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / BARE_WEIGHTS))


def _unsharded_generator(sharded: Path, out: Path) -> dict:
    """The sharded checkpoint as one Composer-style ``.pt`` file, by torch's converter (no code of this repo)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(sharded, out)
    model = torch.load(out, map_location='cpu', weights_only=False)['state']['model']
    return {k[len('generator.'):]: v for k, v in model.items() if k.startswith('generator.')}


def _check_sharded_export(version: str, run: Path, tmp_path: Path) -> None:
    # The run folder holds what Composer wrote: sharded folders, latest-rank0.pt -> the newest, the run config.
    assert os.readlink(run / 'latest-rank0.pt') == LAST
    assert (run / LAST / '.metadata').is_file() and len(list((run / LAST).glob('*.distcp'))) == 2
    assert (run / 'run_config.yaml').is_file()
    assert main([str(run), str(tmp_path / 'sharded')]) == 0
    flat = tmp_path / 'unsharded' / f'{LAST}-rank0.pt'
    flat.parent.mkdir()
    weights = _unsharded_generator(run / LAST, flat)
    assert main([str(flat), str(tmp_path / 'from_unsharded'), '--config', str(run / 'run_config.yaml')]) == 0
    bare = _bare(tmp_path / 'sharded')
    assert bare.keys() == weights.keys()
    assert all(torch.equal(bare[k], weights[k]) for k in weights)
    from senseflow_algos.models.families import get_family

    initial = get_family('flux').tiny_components(seed=17).student.state_dict()  # tiny_flux.yaml's seed
    assert any(not torch.equal(initial[k], weights[k]) for k in weights), 'the generator trained'
    a, b = _images(tmp_path / 'sharded'), _images(tmp_path / 'from_unsharded')
    diff = (a - b).abs().max().item()
    print(f'FSDP{version}: max |sharded export - unsharded export| = {diff:.3g}')
    assert diff <= ATOL
    # The callback gathered the generator to rank 0 and wrote a loadable pipeline with the final weights.
    callback = run / 'export'
    gathered = _bare(callback)
    assert gathered.keys() == weights.keys() and all(torch.equal(gathered[k], weights[k]) for k in weights)
    diff = (_images(callback) - a).abs().max().item()
    print(f'FSDP{version}: max |callback export - sharded export| = {diff:.3g}')
    assert diff <= ATOL


def test_fsdp2_sharded_checkpoint_exports_like_unsharded(straight, tmp_path):
    _check_sharded_export('2', straight('2'), tmp_path)


def test_fsdp1_sharded_checkpoint_exports_like_unsharded(straight, tmp_path):
    _check_sharded_export('1', straight('1'), tmp_path)


@pytest.fixture()
def s3(monkeypatch):
    """A local moto S3 server (``moto[server]``), as Composer's S3ObjectStore and boto3 reach it: S3_ENDPOINT_URL."""
    boto3 = pytest.importorskip('boto3')
    server_mod = pytest.importorskip('moto.server')
    server = server_mod.ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f'http://{host}:{port}'
    for key, value in {'S3_ENDPOINT_URL': endpoint, 'AWS_ACCESS_KEY_ID': 'test', 'AWS_SECRET_ACCESS_KEY': 'test',
                       'AWS_DEFAULT_REGION': 'us-east-1'}.items():
        monkeypatch.setenv(key, value)
    boto3.client('s3', endpoint_url=endpoint).create_bucket(Bucket='senseflow')
    yield boto3.client('s3', endpoint_url=endpoint)
    server.stop()


def test_export_from_an_object_store_end_to_end(s3, straight, tmp_path):
    from composer.utils import create_symlink_file, maybe_create_object_store_from_uri

    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config
    from senseflow_algos.restore import restore_student
    from senseflow_algos.sampling import sample

    # Unsharded: a training run saves to the bucket through Composer, and its run config with it.
    cfg = load_config(REPO / 'yamls' / 'tiny_flux.yaml', [
        'trainer.progress_bar=false', 'trainer.max_duration=2ba', 'trainer.save_interval=1ba', 'model.gen_every=2',
        'algorithms.vfm_discriminator=null', 'trainer.save_folder=s3://senseflow/runs/tiny'])
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    names = {o['Key'] for o in s3.list_objects_v2(Bucket='senseflow')['Contents']}
    assert {'runs/tiny/run_config.yaml', 'runs/tiny/ep0-ba2-rank0.pt', 'runs/tiny/latest-rank0.pt.symlink'} <= names
    assert main(['s3://senseflow/runs/tiny', str(tmp_path / 'from_s3')]) == 0
    live = sample(trainer.state.model, PROMPTS, rng=seeded_default_rng(0)).images
    diff = (_images(tmp_path / 'from_s3') - live).abs().max().item()
    print(f'object store (unsharded): max |export - trained model| = {diff:.3g}')
    assert diff <= 1e-5  # the pipeline's FLUX timestep path differs from the in-repo sampler by float rounding
    # Sharded: the FSDP2 run folder laid out in the bucket as Composer uploads it (shards, .metadata, the latest link).
    run = straight('2')
    store = maybe_create_object_store_from_uri('s3://senseflow/fsdp2')
    for path in [run / 'run_config.yaml', *sorted((run / LAST).iterdir())]:
        store.upload_object(str(Path('fsdp2') / path.relative_to(run)), str(path))
    create_symlink_file(f'fsdp2/{LAST}', str(tmp_path / 'latest.symlink'))
    store.upload_object('fsdp2/latest-rank0.pt.symlink', str(tmp_path / 'latest.symlink'))
    student = restore_student('s3://senseflow/fsdp2', cache=tmp_path / 'cache')
    assert (tmp_path / 'cache' / LAST / '.metadata').is_file()
    local = restore_student(run)
    assert all(torch.equal(a, b) for a, b in zip(student.generator.state_dict().values(),
                                                  local.generator.state_dict().values()))
