"""Tiny, random-weight, fully offline FLUX and SD3.5 text-to-image pipelines.

The pipelines use the real diffusers / transformers classes with minimal sizes so
that CPU tests and demo configs can run the complete training and sampling code
paths without downloading anything. Tokenizers are built in-process with the
``tokenizers`` library over a small vocabulary of prompt words.

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
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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

LATENT_CHANNELS = 4
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

_CLIP_BOS, _CLIP_EOS, _EOW = "<|startoftext|>", "<|endoftext|>", "</w>"
_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
_WORDS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta "
    "circle square triangle rectangle star ellipse oval hexagon pentagon cross heart diamond line dot "
    "a an the above below left right of and on in to with next top bottom small large big tiny "
    "photo image picture background"
).split() + list(_CHARS)


def _bpe_merge(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges the way ``tokenizers`` does: lowest rank first, then leftmost."""
    while True:
        candidates = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
        if not candidates:
            return pieces
        _, i = min(candidates)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]


def _clip_tokenizer() -> CLIPTokenizerFast:
    """Builds a CLIP-style BPE tokenizer in which every word of ``_WORDS`` is one token.

    Other words fall back to single characters; unknown characters map to the
    end-of-text token, which CLIP also uses as unk and pad token.
    """
    vocab = {_CLIP_BOS: 0, _CLIP_EOS: 1}
    for char in _CHARS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + _EOW, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    # Add merges until each word encodes to one token; later merges have a higher
    # rank, so they never change how earlier words are encoded.
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + _EOW]
        while len(pieces := _bpe_merge(pieces, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    backend = Tokenizer(models.BPE(vocab, list(ranks), unk_token=_CLIP_EOS, end_of_word_suffix=_EOW))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # CLIPTokenizerFast requires a pre-tokenizer Sequence.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_CLIP_BOS} $A {_CLIP_EOS}",
        pair=f"{_CLIP_BOS} $A {_CLIP_EOS} $B {_CLIP_EOS}",
        special_tokens=[(_CLIP_BOS, 0), (_CLIP_EOS, 1)],
    )
    backend.decoder = decoders.BPEDecoder(suffix=_EOW)
    return CLIPTokenizerFast(tokenizer_object=backend, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5TokenizerFast:
    """Builds a word-level T5-style tokenizer; unknown words map to ``<unk>``."""
    vocab = {tok: i for i, tok in enumerate([_T5_PAD, _T5_EOS, _T5_UNK, *dict.fromkeys(_WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=_T5_UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {_T5_EOS}", pair=f"$A {_T5_EOS} $B {_T5_EOS}", special_tokens=[(_T5_EOS, 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=T5_MAX_LENGTH)


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
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
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
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
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


BUILDERS = {"flux": build_tiny_flux_pipeline, "sd35": build_tiny_sd3_pipeline}


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Builds a tiny pipeline and saves it with safetensors weights.

    Args:
        family: ``'flux'`` or ``'sd35'``.
        folder: Output folder, created if needed.
        seed: Seed for the random weights.

    Returns:
        The folder written, loadable with ``DiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: If ``family`` is unknown.
    """
    if family not in BUILDERS:
        raise ValueError(f"Unknown family {family!r}; expected one of {sorted(BUILDERS)}.")
    folder = Path(folder)
    BUILDERS[family](seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: saves a tiny pipeline and prints its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m senseflow_algos.models.tiny",
        description="Save a tiny random-weight offline text-to-image pipeline.",
    )
    parser.add_argument("family", choices=sorted(BUILDERS), help="Pipeline family.")
    parser.add_argument("folder", help="Output folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights (default: 0).")
    args = parser.parse_args(argv)
    print(save_tiny_pipeline(args.family, args.folder, seed=args.seed))


if __name__ == "__main__":
    main()
