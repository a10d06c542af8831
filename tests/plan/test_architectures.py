"""The shipped architecture configs build the published networks: parameter counts against the models' published
sizes, forward FLOPs against the meta-device measurements in /work/shared/reference/cost-facts.md, and a local
pipeline folder read from its own configs against the same folder loaded with its weights."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from senseflow_algos.config import ConfigError
from senseflow_algos.models.families import get_family
from senseflow_algos.plan.architectures import (
    ARCHITECTURES_DIR,
    DINOV2_CONFIG,
    HUB_IDS,
    architecture_folder,
    build_component,
    meta_components,
)
from senseflow_algos.plan.metarun import measure_pass

REPO = Path(__file__).resolve().parents[2]

# Published sizes (parameters; SD 3.5 Medium's 2.47B counts its 384x384x1536 position-embedding table, which diffusers
# holds as a buffer, as its model card and safetensors do).
PUBLISHED = [
    ('flux1-dev', 'transformer', 11.90e9, False),
    ('sd35-large', 'transformer', 8.06e9, False),
    ('sd35-medium', 'transformer', 2.47e9, True),
    ('flux1-dev', 'text_encoder_2', 4.76e9, False),  # T5-XXL encoder
    ('sd35-large', 'text_encoder_3', 4.76e9, False),
    ('flux1-dev', 'text_encoder', 123e6, False),  # CLIP-L text
    ('sd35-large', 'text_encoder', 123.06e6 + 768 * 768, False),  # CLIP-L text + its 768x768 projection
    ('sd35-large', 'text_encoder_2', 695e6, False),  # OpenCLIP bigG text + projection
    ('flux1-dev', 'vae', 83.8e6, False),
    ('sd35-medium', 'vae', 83.8e6, False),
    ('qwen-image', 'transformer', 20.43e9, False),  # Qwen/Qwen-Image: 40.86 GB of bf16 safetensors
    ('qwen-image', 'text_encoder', 8.29e9, False),  # Qwen2.5-VL-7B-Instruct (language model + vision tower)
]


@functools.lru_cache(maxsize=None)
def _meta(folder: str, component: str) -> torch.nn.Module:
    with torch.device('meta'):
        return build_component(ARCHITECTURES_DIR / folder, component, torch.bfloat16)


@pytest.mark.parametrize('folder,component,published,with_buffers', PUBLISHED)
def test_parameter_counts_match_published_sizes(folder, component, published, with_buffers):
    net = _meta(folder, component)
    n = sum(p.numel() for p in net.parameters())
    if with_buffers:
        n += sum(b.numel() for b in net.buffers())
    assert abs(n - published) / published < 0.005, f'{folder}/{component}: {n / 1e9:.4f}B vs {published / 1e9:.4f}B'


def test_dinov2_large_config_matches_timm_and_its_size():
    import timm

    record = json.loads(DINOV2_CONFIG.read_text())
    with torch.device('meta'):
        vit = timm.create_model(record['timm_name'], pretrained=False, num_classes=0)
    args = record['model_args']
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (args['embed_dim'], args['depth'],
                                                                             args['num_heads'])
    assert vit.patch_embed.patch_size == (args['patch_size'],) * 2 and vit.patch_embed.img_size == (args['img_size'],) * 2
    assert abs(sum(p.numel() for p in vit.parameters()) - 304.37e6) < 0.01e6  # DINOv2 ViT-L/14: 304M


@pytest.mark.parametrize('folder,family,tokens,published_tflop', [
    ('flux1-dev', 'flux', 512, 74.4),  # 4096 image + 512 text tokens
    ('sd35-large', 'sd35', 333, 31.1),  # 4096 image + 77 CLIP + 256 T5 tokens
])
def test_teacher_forward_flops_match_cost_facts(folder, family, tokens, published_tflop):
    fam, net = get_family(family), _meta(folder, 'transformer')
    config = net.config
    x = torch.empty(1, 16, 128, 128, device='meta')  # 1024^2 through the 8x VAE
    cond = {'prompt_embeds': torch.empty(1, tokens, config.joint_attention_dim, device='meta'),
            'pooled_prompt_embeds': torch.empty(1, config.pooled_projection_dim, device='meta')}
    # FLUX.1-dev's embedded guidance (a 256 -> 3072 -> 3072 MLP) is a rounding error next to 74 TFLOP.
    guidance = torch.empty(1, device='meta') if family == 'flux' else None
    cost = measure_pass(lambda: fam.velocity(net, x, torch.empty(1, device='meta'), cond, guidance), False)
    assert abs(cost.forward_flops / 1e12 - published_tflop) < 0.05, cost.forward_flops / 1e12  # 3 digits published


def test_meta_components_assemble_the_family_networks():
    """FLUX's generator is the teacher without its guidance embedding; SD 3.5's a trainable copy."""
    flux = meta_components(get_family('flux'), architecture_folder('black-forest-labs/FLUX.1-dev'), torch.float32,
                           torch.bfloat16, torch.bfloat16, text_encoders=False, vae_encoder=False)
    embedder = sum(p.numel() for n, p in flux.teacher.named_parameters() if '.guidance_embedder.' in n)
    assert embedder > 0 and sum(p.numel() for p in flux.student.parameters()) == \
        sum(p.numel() for p in flux.teacher.parameters()) - embedder
    assert {p.dtype for p in flux.student.parameters()} == {torch.float32} and flux.conditioner is None
    assert all(p.requires_grad for p in flux.student.parameters()) and flux.vae.encoder is None


def test_hub_ids_map_to_shipped_pipeline_folders():
    for hub_id, name in HUB_IDS.items():
        folder = architecture_folder(hub_id)
        assert folder == ARCHITECTURES_DIR / name and (folder / 'model_index.json').is_file()


def test_unknown_pretrained_is_named():
    with pytest.raises(ConfigError, match=r"model.pretrained='someone/unknown-model'"):
        architecture_folder('someone/unknown-model')


def test_local_folder_is_read_from_its_own_configs():
    """The shapes teacher's configs, built on meta, have exactly the shapes of its weights loaded from disk."""
    from diffusers import FluxTransformer2DModel

    folder = REPO / 'senseflow_algos' / 'shapes' / 'assets' / 'teacher'
    assert architecture_folder(str(folder)) == folder
    with torch.device('meta'):
        meta = build_component(folder, 'transformer', torch.float32)
    real = FluxTransformer2DModel.from_pretrained(folder, subfolder='transformer')
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
