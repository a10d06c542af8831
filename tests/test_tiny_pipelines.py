"""Tests for the tiny offline FLUX / SD3.5 pipelines in ``senseflow_algos.models.tiny``."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from senseflow_algos.models.tiny import (
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    main,
    save_tiny_pipeline,
)

PIPELINE_CLASSES = {"flux": FluxPipeline, "sd35": StableDiffusion3Pipeline}
# Expected component classes after a save / load round trip.
COMPONENT_CLASSES = {
    "flux": {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizerFast,
        "text_encoder_2": T5EncoderModel,
        "tokenizer_2": T5TokenizerFast,
    },
    "sd35": {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "text_encoder": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizerFast,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer_2": CLIPTokenizerFast,
        "text_encoder_3": T5EncoderModel,
        "tokenizer_3": T5TokenizerFast,
    },
}
BUILDERS = {"flux": build_tiny_flux_pipeline, "sd35": build_tiny_sd3_pipeline}
GUIDANCE_SCALE = {"flux": 3.5, "sd35": 2.0}  # FLUX: embedded guidance; SD3: real CFG.
T5_NAME = {"flux": "text_encoder_2", "sd35": "text_encoder_3"}


def _generate(pipe, family: str) -> torch.Tensor:
    return pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=GUIDANCE_SCALE[family],
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module", params=["flux", "sd35"])
def saved(request, tmp_path_factory):
    """(family, original pipeline, folder) for each family, saved once per module."""
    family = request.param
    pipe = BUILDERS[family](seed=0)
    folder = tmp_path_factory.mktemp(family)
    pipe.save_pretrained(folder)
    return family, pipe, folder


def test_roundtrip_generic_loader(saved):
    family, pipe, folder = saved
    assert list(folder.rglob("*.safetensors"))
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is PIPELINE_CLASSES[family]
    for name, cls in COMPONENT_CLASSES[family].items():
        assert type(getattr(loaded, name)) is cls, name
    for name, module in loaded.components.items():
        if isinstance(module, torch.nn.Module):
            assert not module.training, name
            assert all(p.dtype == torch.float32 for p in module.parameters()), name
            _assert_same_weights(getattr(pipe, name), module)
    assert type(loaded.text_encoder.config) is CLIPTextConfig
    assert type(getattr(loaded, T5_NAME[family]).config) is T5Config
    assert loaded.vae.config.scaling_factor == 0.5 and loaded.vae.config.shift_factor == 0.1
    assert loaded.vae_scale_factor == 2
    assert loaded.tokenizer.model_max_length == 77


def test_loaded_pipeline_generates(saved):
    family, pipe, folder = saved
    loaded = PIPELINE_CLASSES[family].from_pretrained(folder)
    images = _generate(loaded, family)
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, _generate(pipe, family))


def test_tokenizers_roundtrip(saved):
    family, pipe, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder)
    prompt = "A blue square above the red circle, left of 3 zebras"
    names = [n for n in COMPONENT_CLASSES[family] if n.startswith("tokenizer")]
    for name in names:
        orig, new = getattr(pipe, name), getattr(loaded, name)
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        assert orig(prompt, **kwargs).input_ids == new(prompt, **kwargs).input_ids
        assert len(new(prompt * 20, **kwargs).input_ids) == 77
    clip_tokens = loaded.tokenizer.tokenize(prompt)
    assert clip_tokens[:4] == ["a</w>", "blue</w>", "square</w>", "above</w>"]
    t5 = getattr(loaded, T5_NAME[family].replace("text_encoder", "tokenizer"))
    ids = t5(prompt).input_ids
    assert ids[-1] == t5.eos_token_id and ids.count(t5.unk_token_id) == 1  # only "zebras" is unknown


def test_flux_scheduler_config():
    config = build_tiny_flux_pipeline().scheduler.config
    assert config.use_dynamic_shifting and config.shift == 3.0
    assert (config.base_shift, config.max_shift) == (0.5, 1.15)
    assert (config.base_image_seq_len, config.max_image_seq_len) == (256, 4096)


def test_flux_without_guidance_embeds():
    pipe = build_tiny_flux_pipeline(guidance_embeds=False)
    assert pipe.transformer.config.guidance_embeds is False
    assert not hasattr(pipe.transformer.time_text_embed, "guidance_embedder")
    assert hasattr(build_tiny_flux_pipeline().transformer.time_text_embed, "guidance_embedder")
    images = _generate(pipe, "flux")
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_seed_determinism(family):
    a, b, c = (BUILDERS[family](seed=s) for s in (0, 0, 1))
    for name, module in a.components.items():
        if isinstance(module, torch.nn.Module):
            _assert_same_weights(module, getattr(b, name))
            other = getattr(c, name).state_dict()
            assert any(not torch.equal(v, other[k]) for k, v in module.state_dict().items()), name


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_cli_writes_loadable_folder(family, tmp_path, capsys):
    folder = tmp_path / "out"
    main([family, str(folder), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(folder)
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is PIPELINE_CLASSES[family]
    _assert_same_weights(loaded.transformer, BUILDERS[family](seed=3).transformer)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "flux" in capsys.readouterr().out


def test_save_rejects_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="'no-such-family' is not a known family"):
        save_tiny_pipeline("no-such-family", tmp_path)
