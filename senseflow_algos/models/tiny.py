"""Tiny, random-weight, fully offline FLUX and SD3.5 text-to-image pipelines (other families build theirs in their
own module; ``save_tiny_pipeline`` saves any family's).

The pipelines use the real diffusers / transformers classes with minimal sizes so
that CPU tests and demo configs can run the complete training and sampling code
paths without downloading anything. Tokenizers are built in-process over a small
vocabulary of prompt words (:mod:`senseflow_algos.models.tiny_tokenizers`).

Example:
    python -m senseflow_algos.models.tiny flux /tmp/tiny-flux --seed 0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers import (
    AutoencoderKL,
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

from senseflow_algos.flow import FLUX_SHIFT
from senseflow_algos.models.tiny_tokenizers import CLIP_MAX_LENGTH, tiny_clip_tokenizer, tiny_t5_tokenizer

LATENT_CHANNELS = 4


def _clip_config(tokenizer: CLIPTokenizerFast, hidden_size: int, projection_dim: int) -> CLIPTextConfig:
    """Tiny two-layer CLIP text encoder config matching ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int, seed: int) -> T5EncoderModel:
    """Tiny two-layer T5 v1.1-style (gated-GELU) encoder matching ``tokenizer``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _tiny_vae(seed: int) -> AutoencoderKL:
    """Two-level VAE (spatial factor 2) with non-trivial scaling and shift factors."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Builds a tiny random-weight FLUX.1 pipeline.

    Sizes: latent channels 4 (packed 2x2, so transformer in_channels 16), VAE
    scale factor 2, CLIP hidden 24 (= pooled_projection_dim), T5 d_model 32
    (= joint_attention_dim), transformer 1 double + 1 single block with 2 heads of
    dim 16. Token lengths: CLIP 77, T5 up to 512.

    Args:
        seed: Seed for every module's random initialisation.
        guidance_embeds: Whether the transformer embeds the guidance scale
            (FLUX.1-dev style) or not (FLUX.1-schnell style).

    Returns:
        The pipeline with fp32 modules in eval mode.
    """
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_hidden, t5_width = 24, 32
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, clip_hidden, clip_hidden)).eval()
    text_encoder_2 = _t5_encoder(tokenizer_2, t5_width, seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        **FLUX_SHIFT.scheduler_kwargs(),
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Builds a tiny random-weight SD3.5-style pipeline (QK RMS-norm transformer).

    Sizes: latent channels 4, VAE scale factor 2, patch size 2, CLIP-L hidden 16 /
    projection 16, CLIP-G hidden 24 / projection 24 (pooled_projection_dim 40),
    T5 d_model 48 (= joint_attention_dim, wider than the 40 concatenated CLIP
    features so the pipeline's zero padding is exercised), transformer 2 joint
    blocks with 2 heads of dim 16. Token lengths: CLIP 77, T5 up to 512.

    Args:
        seed: Seed for every module's random initialisation.

    Returns:
        The pipeline with fp32 modules in eval mode.
    """
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    (clip_l, proj_l), (clip_g, proj_g), t5_width = (16, 16), (24, 24), 48
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, clip_l, proj_l)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, clip_g, proj_g)).eval()
    text_encoder_3 = _t5_encoder(tokenizer_3, t5_width, seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=proj_l + proj_g,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Builds a tiny pipeline and saves it with safetensors weights.

    Args:
        family: ``model.family`` name (any registered family; its ``tiny_pipeline``).
        folder: Output folder, created if needed.
        seed: Seed for the random weights.

    Returns:
        The folder written, loadable with ``DiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: If ``family`` is unknown.
    """
    from senseflow_algos.models.families import get_family

    folder = Path(folder)
    get_family(family).tiny_pipeline(seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: saves a tiny pipeline and prints its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m senseflow_algos.models.tiny",
        description="Save a tiny random-weight offline text-to-image pipeline.",
    )
    from senseflow_algos.models.families import FAMILIES

    parser.add_argument("family", choices=sorted(FAMILIES), help="Pipeline family.")
    parser.add_argument("folder", help="Output folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights (default: 0).")
    args = parser.parse_args(argv)
    print(save_tiny_pipeline(args.family, args.folder, seed=args.seed))


if __name__ == "__main__":
    main()
