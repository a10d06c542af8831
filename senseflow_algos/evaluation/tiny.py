"""A tiny random-weight CLIP (``transformers`` ``CLIPModel`` + processor) saved to a folder: for tests and smoke runs
of the CLIP score and PickScore code paths offline. Its scores mean nothing.

Example:
    python -m senseflow_algos.evaluation.tiny /tmp/tiny-clip
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ['save_tiny_clip']


def save_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Build and save a tiny random-weight CLIP with a processor (the tiny pipelines' CLIP tokenizer).

    Args:
        folder: Output folder (``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` load it).
        seed (int): Weight seed.
        image_size (int): The processor resizes and crops images to this side.

    Returns:
        Path: The folder.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from senseflow_algos.models.tiny import build_tiny_flux_pipeline

    tokenizer = build_tiny_flux_pipeline(seed=seed).tokenizer
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={'shortest_edge': image_size},
                                           crop_size={'height': image_size, 'width': image_size}),
        tokenizer=tokenizer)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: save a tiny CLIP and print its folder."""
    parser = argparse.ArgumentParser(prog='python -m senseflow_algos.evaluation.tiny',
                                     description='Save a tiny random-weight CLIP (offline smoke tests).')
    parser.add_argument('folder')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_clip(args.folder, seed=args.seed))


if __name__ == '__main__':
    main()
