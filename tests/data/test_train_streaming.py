"""Training from MDS through the YAML ``dataset:`` section: the tiny FLUX config trains from precomputed data with no
text encoder and no VAE encoder loaded; mid-epoch resume (dataset level and through Composer checkpoints) gives the
batches of the uninterrupted run; several streams mix with proportions; prompt-only data and the VFM
discriminator."""

from __future__ import annotations

import math

import pytest
import torch
from composer.core import Callback

from tests.data.conftest import NUM_IMAGES, REPO, read_dataset

REPO_YAMLS = REPO / 'yamls'


class BatchRecorder(Callback):
    """Records each trained batch's prompts and a checksum of its tensors."""

    def __init__(self):
        self.batches: list[tuple] = []

    def after_dataloader(self, state, logger):
        batch = state.batch
        sums = tuple(round(float(batch[k].double().sum()), 6) for k in sorted(batch) if torch.is_tensor(batch[k]))
        self.batches.append((tuple(batch.get('prompt', ())), sums))


def _mds_overrides(root, *more):
    return [f'dataset.remote={root}', 'trainer.autoresume=false', *more]


def test_tiny_config_trains_from_precomputed_without_encoders(make_trainer, precomputed, tmp_path):
    from transformers import CLIPTextModel, T5EncoderModel

    trainer, rec = make_trainer('tiny_flux_mds', _mds_overrides(precomputed('flux'), 'trainer.max_duration=3ba',
                                                                'model.gen_every=1'))
    model = trainer.state.model
    assert model.conditioner is None and 'conditioner' not in model.frozen_modules
    assert not any(isinstance(m, (CLIPTextModel, T5EncoderModel)) for m in model.modules())
    assert model.vae.encoder is None and model.vae.decoder is not None
    assert not any(n.startswith(('conditioner.', 'vae.encoder.')) for n, _ in model.named_parameters())
    batches = BatchRecorder()
    trainer.state.callbacks.append(batches)
    trainer.fit()
    trainer.close()
    assert len(rec.losses) == 3
    assert all(math.isfinite(v) for losses in rec.losses for v in losses.values())
    # Every algorithm of the tiny config ran, the VFM discriminator on the decoded images of the precomputed data.
    assert all('loss/train/generator/adversarial' in losses for losses in rec.losses)
    assert all('loss/train/discriminator/hinge' in losses for losses in rec.losses)
    assert len(batches.batches) == 3 and all(len(p) == 2 for p, _ in batches.batches)


def test_model_without_text_encoders_refuses_raw_captions(make_trainer, image_mds):
    trainer, _ = make_trainer('tiny_flux_mds', _mds_overrides(image_mds, 'dataset.kind=image_caption',
                                                              'trainer.max_duration=1ba'), drop_algorithms=True)
    with pytest.raises(KeyError, match='model.text_encoders=false'):
        trainer.fit()
    trainer.close()


def test_dataset_resumes_mid_epoch_exactly(image_mds):
    batch_size = 2
    full = [b['prompt'] for b in read_dataset(image_mds, batch_size=batch_size, shuffle=True)]
    assert len(full) == NUM_IMAGES // batch_size
    images = [b['image'] for b in read_dataset(image_mds, batch_size=batch_size, shuffle=True)]
    # An interrupted run: 2 batches, then its state as Composer checkpoints it (samples seen in this epoch).
    first = read_dataset(image_mds, batch_size=batch_size, shuffle=True)
    it = iter(first)
    seen = [next(it)['prompt'] for _ in range(2)]
    state = first.dataset.state_dict(num_samples=2 * batch_size, from_beginning=True)
    del it
    resumed = read_dataset(image_mds, batch_size=batch_size, shuffle=True)
    resumed.dataset.load_state_dict(state)
    rest = list(resumed)
    assert seen == full[:2]
    assert [b['prompt'] for b in rest] == full[2:]
    for got, want in zip(rest, images[2:]):
        assert torch.equal(got['image'], want)
    # The shuffle depends on the seed: another seed gives another order.
    other = [b['prompt'] for b in read_dataset(image_mds, batch_size=batch_size, shuffle=True, seed=5)]
    assert other != full


def test_composer_checkpoint_resume_sees_the_same_batches(make_trainer, precomputed, tmp_path):
    root = precomputed('flux')
    base = _mds_overrides(root, 'model.gen_every=2')

    def run(duration, save=None, load=None):
        overrides = [*base, f'trainer.max_duration={duration}']
        if save:
            overrides += [f'trainer.save_folder={save}', 'trainer.save_interval=2ba']
        if load:
            overrides += [f'trainer.load_path={load}']
        trainer, rec = make_trainer('tiny_flux_mds', overrides, drop_algorithms=True)
        batches = BatchRecorder()
        trainer.state.callbacks.append(batches)
        trainer.fit()
        trainer.close()
        return batches.batches, rec.losses

    full_batches, full_losses = run('4ba')
    run('2ba', save=tmp_path / 'ckpt')
    resumed_batches, resumed_losses = run('4ba', load=tmp_path / 'ckpt' / 'ep0-ba2-rank0.pt')
    assert len(full_batches) == 4 and len(resumed_batches) == 2
    assert resumed_batches == full_batches[2:]
    assert resumed_losses == full_losses[2:]


def test_streams_mix_with_proportions(tmp_path, run_script):
    from senseflow_algos.data.streaming import build_streaming_dataloader

    for name in ('a', 'b'):
        txt = tmp_path / f'{name}.txt'
        txt.write_text(''.join(f'{name} prompt {i}\n' for i in range(8)))
        assert run_script('prompts_to_mds', '--prompts', txt, '--out', tmp_path / name) == 0
    loader = build_streaming_dataloader(
        'prompts', batch_size=4, resolution=32, seed=0, shuffle=True,
        streams=[{'remote': str(tmp_path / 'a'), 'proportion': 0.75}, {'remote': str(tmp_path / 'b'),
                                                                        'proportion': 0.25}],
        streaming_kwargs={'num_canonical_nodes': 1, 'epoch_size': 16})
    prompts = [p for b in loader for p in b['prompt']]
    assert len(prompts) == 16
    assert sum(p.startswith('a ') for p in prompts) == 12 and sum(p.startswith('b ') for p in prompts) == 4


def test_prompt_only_data_trains_by_backward_simulation(make_trainer, tmp_path, run_script):
    txt = tmp_path / 'prompts.txt'
    txt.write_text(''.join(f'a {c} circle\n' for c in ('red', 'green', 'blue', 'white')))
    assert run_script('prompts_to_mds', '--prompts', txt, '--out', tmp_path / 'p') == 0
    overrides = [f'dataset.remote={tmp_path / "p"}', 'dataset.kind=prompts', 'model.text_encoders=true',
                 'model.vae_encoder=true', 'trainer.max_duration=2ba', 'model.gen_every=1', 'model.backsim_prob=0.0']
    trainer, rec = make_trainer('tiny_flux_mds', overrides, drop_algorithms=True)
    outputs = []

    class Outputs(Callback):

        def after_forward(self, state, logger):
            outputs.append(bool(state.outputs.backward_simulation))

    trainer.state.callbacks.append(Outputs())
    trainer.fit()
    trainer.close()
    assert len(rec.losses) == 2 and outputs and all(outputs)  # backsim_prob 0, yet no real latents: backsim
    # The VFM discriminator needs real images: it refuses prompt-only data clearly.
    trainer, _ = make_trainer('tiny_flux_mds', overrides)
    with pytest.raises(KeyError, match="VFMDiscriminator needs real images"):
        trainer.fit()
    trainer.close()


def test_production_config_switches_to_precomputed_by_overrides(precomputed):
    """The README's override set turns yamls/flux.yaml (online-encoded images) into a precomputed-MDS run."""
    from senseflow_algos.builders import build_dataloader
    from senseflow_algos.config import load_config, validate_config

    cfg = load_config(REPO_YAMLS / 'flux.yaml', [
        'dataset.kind=precomputed', f'dataset.remote={precomputed("flux")}', 'dataset.num_samples=null',
        'model.text_encoders=false', 'model.vae_encoder=false', 'model.resolution=32',
        'dataset.streaming_kwargs.num_canonical_nodes=1'])
    validate_config(cfg)
    loader = build_dataloader(cfg['dataset'], resolution=cfg['model']['resolution'], seed=cfg['seed'])
    assert loader.batch_size == 8
    assert loader.dataset.kind == 'precomputed' and loader.dataset.shuffle
    cfg['dataset']['num_samples'] = 100
    with pytest.raises(ValueError, match='dataset.num_samples=null'):
        build_dataloader(cfg['dataset'], resolution=32, seed=0)
