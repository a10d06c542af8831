"""Export round trip: a tiny FLUX / SD 3.5 student trained 2 batches by the real Composer trainer (with the
``sample_grid`` and ``export_pipeline`` callbacks), exported from its checkpoint, loaded with
``DiffusionPipeline.from_pretrained`` and sampled in 4 steps: the same images as the in-repo sampler."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from senseflow_algos.checkpointing import CheckpointError
from senseflow_algos.config import load_config, validate_config
from senseflow_algos.export import (
    BARE_WEIGHTS,
    EXPORT_INFO,
    export_checkpoint,
    main,
    pipeline_call_kwargs,
    sampling_components_from_pipeline,
)
from senseflow_algos.restore import read_generator_state, resolve_checkpoint, restore_student
from senseflow_algos.sampling import sample, seeded_default_rng

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ['a red circle above a blue square', 'a small green star']
GRID_PROMPTS = ['a red circle', 'a blue square', 'a green star']
ATOL = 1e-5  # measured: FLUX 6e-7 (the pipeline passes t*1000/1000 and computes the shift in float32), SD 3.5 0


def _yaml(family: str) -> Path:
    return REPO / 'yamls' / f'tiny_{family}.yaml'


def _overrides(folder: Path) -> list[str]:
    return ['trainer.progress_bar=false', 'trainer.max_duration=2ba', f'trainer.save_folder={folder}',
            'trainer.save_interval=1ba', 'algorithms.vfm_discriminator=null']


class _ImageCapture:
    """A Composer logger destination keeping what ``log_images`` receives."""

    def __new__(cls):
        from composer.loggers import LoggerDestination

        class Capture(LoggerDestination):

            def __init__(self):
                self.images = []

            def log_images(self, images, name='Images', channels_last=False, step=None, masks=None,
                           mask_class_labels=None, use_table=True):
                self.images.append((name, step, tuple(images.shape)))

        return Capture()


@pytest.fixture(scope='module', params=['flux', 'sd35'])
def run(request, tmp_path_factory):
    """Train 2 batches with the sample-grid (every batch) and export callbacks; returns the run's facts."""
    from senseflow_algos.builders import build_trainer

    family = request.param
    folder = tmp_path_factory.mktemp(f'run_{family}')
    overrides = _overrides(folder)
    cfg = load_config(_yaml(family), overrides + [
        'callbacks.sample_grid.every_n_batches=1', f'callbacks.sample_grid.prompts={json.dumps(GRID_PROMPTS)}',
        'callbacks.export_pipeline.method=renoise'])
    validate_config(cfg)
    trainer = build_trainer(cfg)
    capture = _ImageCapture()
    trainer.logger.destinations = (*trainer.logger.destinations, capture)
    trainer.fit()
    trainer.close()
    return {'family': family, 'folder': folder, 'overrides': overrides, 'capture': capture, 'trainer': trainer}


def _pipe_images(folder: Path, seed: int = 0, drop=(), **extra):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in pipeline_call_kwargs(folder).items() if k not in drop}
    out = pipe(PROMPTS, generator=seeded_default_rng(seed), output_type='pt', **kwargs, **extra)
    return pipe, out.images


def test_export_round_trip_reproduces_the_in_repo_sampler(run, tmp_path):
    out = export_checkpoint(run['folder'], tmp_path / 'export', config=_yaml(run['family']),
                            overrides=run['overrides'], progress=False)
    model = restore_student(run['folder'], _yaml(run['family']), run['overrides'])
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0)).images
    # The student restored from the checkpoint (generator alone) samples as the trained model itself.
    live = sample(run['trainer'].state.model, PROMPTS, rng=seeded_default_rng(0)).images
    assert torch.equal(ours, live)
    # FLUX: FluxPipeline's default 4-step sigmas are the anchors; only the training size is passed. SD 3.5: the
    # pipeline needs sigmas= and guidance_scale=1 (written to senseflow_export.json).
    drop = ('sigmas',) if run['family'] == 'flux' else ()
    pipe, theirs = _pipe_images(out, drop=drop)
    diff = (ours - theirs).abs().max().item()
    print(f'{run["family"]}: max |exported - in-repo| = {diff:.3g}')
    assert diff <= ATOL
    assert type(pipe).__name__ == {'flux': 'FluxPipeline', 'sd35': 'StableDiffusion3Pipeline'}[run['family']]
    assert pipe.scheduler.config.stochastic_sampling is True
    # A different seed gives different images (the seed really drives both noises).
    _, other = _pipe_images(out, seed=1, drop=drop)
    assert (other - theirs).abs().max() > 1e-3
    # The exported pipeline's modules through the in-repo sampler: what eval.py runs for exported students.
    parts = sampling_components_from_pipeline(pipe, json.loads((out / EXPORT_INFO).read_text()))
    again = sample(parts, PROMPTS, rng=seeded_default_rng(0)).images
    assert (again - ours).abs().max().item() <= ATOL


def test_export_holds_the_trained_generator_weights(run, tmp_path):
    from safetensors.torch import load_file

    out = export_checkpoint(resolve_checkpoint(run['folder']), tmp_path / 'export', config=_yaml(run['family']),
                            overrides=run['overrides'], dtype='bf16', progress=False)
    state, meta = read_generator_state(run['folder'])
    bare = load_file(str(out / BARE_WEIGHTS))
    assert meta['run_name'] == f'tiny-{run["family"]}'
    assert bare.keys() == state.keys()
    for key, value in state.items():
        assert bare[key].dtype == torch.bfloat16
        torch.testing.assert_close(bare[key], value.to(torch.bfloat16), rtol=0, atol=0)
    # The callback exported the live model at FIT_END: the same weights as the last checkpoint, in fp32.
    callback_bare = load_file(str(run['folder'] / 'export' / BARE_WEIGHTS))
    for key, value in state.items():
        torch.testing.assert_close(callback_bare[key], value, rtol=0, atol=0)
    info = json.loads((run['folder'] / 'export' / EXPORT_INFO).read_text())
    assert info['family'] == run['family'] and info['sampler'] == 'renoise' and len(info['anchors']) == 4


def test_euler_export_reproduces_the_euler_sampler(run, tmp_path):
    if run['family'] == 'flux':
        pytest.skip('one family is enough for the Euler variant (the scheduler code is shared)')
    code = main([str(run['folder']), str(tmp_path / 'euler'), '--config', str(_yaml(run['family'])),
                 *run['overrides'], '--method', 'euler', '--no-bare'])
    assert code == 0
    assert not (tmp_path / 'euler' / BARE_WEIGHTS).exists()
    model = restore_student(run['folder'], _yaml(run['family']), run['overrides'])
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0), method='euler').images
    pipe, theirs = _pipe_images(tmp_path / 'euler')
    assert pipe.scheduler.config.stochastic_sampling is False
    assert (ours - theirs).abs().max().item() <= ATOL


def test_flux_student_loads_without_guidance_embedding(run):
    if run['family'] != 'flux':
        pytest.skip('FLUX only')
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    folder = run['folder'] / 'export'
    config = json.loads((folder / 'transformer' / 'config.json').read_text())
    assert config['guidance_embeds'] is False
    net = FluxTransformer2DModel.from_pretrained(str(folder / 'transformer'))
    assert net.config.guidance_embeds is False
    assert not any('guidance_embedder' in k for k in net.state_dict())
    assert not any('guidance_embedder' in k for k in load_file(str(folder / BARE_WEIGHTS)))
    # The teacher it was distilled from does embed guidance.
    assert run['trainer'].state.model.teacher.config.guidance_embeds is True


def test_sample_grid_callback_writes_and_logs_a_grid(run):
    samples = run['folder'] / 'samples'
    pngs = sorted(p.name for p in samples.glob('*.png'))
    assert pngs == ['ba0000001.png', 'ba0000002.png']  # every batch; FIT_END does not render batch 2 twice
    assert (samples / 'prompts.txt').read_text().splitlines() == GRID_PROMPTS
    from PIL import Image

    with Image.open(samples / pngs[-1]) as grid:
        assert grid.size == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # 3 images, 2 per row, 2 px padding
    logged = run['capture'].images
    assert [(name, step) for name, step, _ in logged] == [('samples', 1), ('samples', 2)]
    assert logged[0][2] == (1, 3, 70, 70)


def test_sample_grid_does_not_change_training(run, tmp_path):
    """The callback samples from its own generator: the trained weights equal those of a run without it."""
    if run['family'] != 'sd35':
        pytest.skip('one family is enough')
    from senseflow_algos.builders import build_trainer

    cfg = load_config(_yaml('sd35'), _overrides(tmp_path / 'plain'))
    cfg['callbacks'] = {}
    validate_config(cfg)
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    plain = trainer.state.model.generator.state_dict()
    watched = run['trainer'].state.model.generator.state_dict()
    for key in plain:
        torch.testing.assert_close(watched[key], plain[key], rtol=0, atol=0)


def test_export_errors_name_the_problem(run, tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        resolve_checkpoint(tmp_path / 'nope.pt')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(CheckpointError, match='no latest-rank0.pt'):
        resolve_checkpoint(empty)
    # Training saved run_config.yaml next to the checkpoints, so no --config is needed.
    assert (run['folder'] / 'run_config.yaml').is_file()
    assert restore_student(run['folder']).family.name == run['family']
    # Without it, the error says what to pass and which YAML has that run_name.
    bare = tmp_path / 'bare'
    bare.mkdir()
    shutil.copy(os.path.realpath(run['folder'] / 'latest-rank0.pt'), bare / 'latest-rank0.pt')
    with pytest.raises(CheckpointError, match=r"--config.*tiny-" + run['family']):
        restore_student(bare)
    if run['family'] == 'sd35':  # weights that do not fit the config's model
        with pytest.raises(CheckpointError, match='do not fit'):
            restore_student(run['folder'], _yaml('flux'), ['trainer.progress_bar=false'])
    assert main([str(tmp_path / 'nope.pt'), str(tmp_path / 'out')]) == 2


def test_the_printed_sampling_command_samples_like_the_in_repo_sampler(run, tmp_path, capsys):
    # The line the export callback and export.py print, run as a user would (a new process), saves the image the
    # pipeline makes with the exported call arguments.
    import shlex
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from senseflow_algos.export import sampling_command

    folder = run['folder'] / 'export'
    line = sampling_command(folder, prompt=PROMPTS[0], image=str(tmp_path / 'student.png'))
    argv = shlex.split(line)
    assert argv[:2] == ['python', '-c']
    subprocess.run([sys.executable, '-c', argv[2]], check=True, cwd=tmp_path)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    want = pipe(PROMPTS[0], generator=seeded_default_rng(0), **pipeline_call_kwargs(folder)).images[0]
    got = Image.open(tmp_path / 'student.png')
    assert got.size == (run['trainer'].state.model.resolution,) * 2  # the training size, not the pipeline default
    assert np.array_equal(np.asarray(got.convert('RGB')), np.asarray(want.convert('RGB')))
