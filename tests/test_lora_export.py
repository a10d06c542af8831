"""LoRA export: a tiny ``model.lora`` student trained 2 batches exports as a fused pipeline and as a diffusers LoRA file
that the teacher's own pipeline loads with ``load_lora_weights``; both give the in-repo sampler's images."""

import json

import pytest
import torch

from senseflow_algos.sampling import sample, seeded_default_rng

pytest.importorskip('peft')

PROMPTS = ['a red circle above a blue square', 'a small green star']


def _teacher_pipeline(model):
    """The teacher's own diffusers pipeline (teacher transformer with its guidance embedding, teacher scheduler)."""
    import diffusers

    c = model.conditioner
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    if model.family.name == 'qwenimage':  # the generic pipeline assembly (its teacher is its own base: no overrides)
        return model.family.build_pipeline(model.teacher, model.vae, model.conditioner, scheduler)
    if model.family.name == 'flux':
        return diffusers.FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=c.text_encoder,
                                      tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                                      transformer=model.teacher)
    return diffusers.StableDiffusion3Pipeline(
        transformer=model.teacher, scheduler=scheduler, vae=model.vae, text_encoder=c.text_encoder,
        tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
        text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3)


@pytest.fixture(scope='module', params=['flux', 'sd35', 'qwenimage'])
def exported(request, tmp_path_factory):
    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config
    from senseflow_algos.export import export_pipeline
    from tests.algorithms.conftest import REPO

    family = request.param
    root = tmp_path_factory.mktemp(f'lora_{family}')
    cfg = load_config(REPO / 'yamls' / f'tiny_{family}.yaml', [
        'trainer.progress_bar=false', 'trainer.max_duration=2ba', 'algorithms.vfm_discriminator=null',
        f'trainer.save_folder={root / "run"}', 'trainer.save_interval=2ba',
        'model.gen_every=1', 'model.lora.rank=4', 'model.lora.alpha=8', 'optimizer.lr=1e-2'])
    validate_config(cfg)
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    model = trainer.state.model.eval()
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    out = export_pipeline(model, root / 'export')
    # The live model keeps its adapters, unmerged and unchanged.
    after = model.generator.state_dict()
    assert after.keys() == before.keys() and any('lora_A' in k for k in after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    teacher_dir = root / 'teacher'
    _teacher_pipeline(model).save_pretrained(teacher_dir)
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0)).images
    return family, model, out, teacher_dir, ours


def _images(pipe, call_kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt', **call_kwargs).images


def test_fused_pipeline_reproduces_the_sampler(exported):
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import pipeline_call_kwargs

    family, model, out, _, ours = exported
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert not any('lora' in k for k in pipe.transformer.state_dict())
    theirs = _images(pipe, pipeline_call_kwargs(out))
    diff = (ours - theirs).abs().max().item()
    print(f'{family} fused LoRA pipeline: max |exported - in-repo| = {diff:.3g}')
    assert diff <= 1e-5  # measured 5e-7: the merge W + s B A rounds differently from W x + s B (A x)
    # The LoRA changed the student: the base alone (the teacher's weights) gives other images.
    assert (ours - _base_images(model)).abs().max().item() > 1e-3


def _base_images(model):
    """The student without its adapters (diffusers' ``disable_adapters``): the teacher's weights."""
    model.generator.disable_adapters()
    try:
        return sample(model, PROMPTS, rng=seeded_default_rng(0)).images
    finally:
        model.generator.enable_adapters()


def test_lora_file_on_the_teacher_pipeline_reproduces_the_sampler(exported):
    from safetensors import safe_open

    from senseflow_algos.export import EXPORT_INFO, pipeline_call_kwargs
    from senseflow_algos.export_lora import load_lora_pipeline

    family, model, out, teacher_dir, ours = exported
    info = json.loads((out / EXPORT_INFO).read_text())
    lora = info['lora']
    assert lora['rank'] == 4 and lora['alpha'] == 8.0 and lora['weights'] == 'lora/pytorch_lora_weights.safetensors'
    with safe_open(str(out / lora['weights']), 'pt') as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()['lora_adapter_metadata'])
    # diffusers' transformer LoRA naming: transformer.<module>.lora_A.weight / lora_B.weight; no guidance layers.
    assert keys and all(k.startswith('transformer.') and ('.lora_A.' in k or '.lora_B.' in k) for k in keys)
    assert not any('guidance' in k for k in keys)
    assert meta['transformer.r'] == 4 and meta['transformer.lora_alpha'] == 8  # read back by load_lora_weights
    pipe = load_lora_pipeline(teacher_dir, out)
    assert type(pipe).__name__ == info['pipeline_class']
    assert pipe.scheduler.config.stochastic_sampling is True
    if family == 'flux':
        assert pipe.transformer.config.guidance_embeds is False
        assert lora['base_transformer_overrides'] == {'guidance_embeds': False}
    theirs = _images(pipe, pipeline_call_kwargs(out))
    diff = (ours - theirs).abs().max().item()
    print(f'{family} teacher pipeline + LoRA file: max |exported - in-repo| = {diff:.3g}')
    assert diff <= 1e-5


def test_lora_checkpoint_exports_through_export_py(exported, tmp_path):
    """``python export.py <run folder>`` of a LoRA run: the restored generator carries the adapters, so the export
    writes the fused pipeline and the LoRA file, both giving the trained model's images."""
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import main, pipeline_call_kwargs
    from senseflow_algos.export_lora import load_lora_pipeline

    family, _, out, teacher_dir, ours = exported
    assert main([str(out.parent / 'run'), str(tmp_path / 'export')]) == 0
    folder = tmp_path / 'export'
    fused = _images(DiffusionPipeline.from_pretrained(str(folder)), pipeline_call_kwargs(folder))
    with_file = _images(load_lora_pipeline(teacher_dir, folder), pipeline_call_kwargs(folder))
    for name, images in (('fused', fused), ('teacher + LoRA file', with_file)):
        diff = (ours - images).abs().max().item()
        print(f'{family} export.py {name}: max |exported - in-repo| = {diff:.3g}')
        assert diff <= 1e-5
