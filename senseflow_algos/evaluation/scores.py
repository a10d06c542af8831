"""Per-image text-image scores: CLIP score, PickScore, HPSv2 and ImageReward.

Every scorer loads from local caches only (unless ``allow_download``); a missing package or missing weights raise
:class:`~senseflow_algos.evaluation.features.MetricUnavailable` with the reason, which the evaluation prints as a
skip message.

* CLIP score: cosine similarity of CLIP image and text embeddings (``transformers`` ``CLIPModel``; the paper's
  numbers are about 0.32).
* PickScore: ``logit_scale * cosine`` of the PickScore CLIP-H model (``yuvalkirstain/PickScore_v1`` with the
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor), about 22-23 in the paper.
* HPSv2 (``pip install hpsv2``) and ImageReward (``pip install image-reward``) through their packages.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from senseflow_algos.evaluation.features import MetricUnavailable

if TYPE_CHECKING:
    from PIL import Image

__all__ = ['Scorer', 'CLIPScorer', 'PickScorer', 'HPSv2Scorer', 'ImageRewardScorer', 'DEFAULT_CLIP_MODEL',
           'DEFAULT_PICKSCORE_MODEL', 'DEFAULT_PICKSCORE_PROCESSOR']

DEFAULT_CLIP_MODEL = 'openai/clip-vit-large-patch14'
DEFAULT_PICKSCORE_MODEL = 'yuvalkirstain/PickScore_v1'
DEFAULT_PICKSCORE_PROCESSOR = 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0] if text else ""}'[:300]


class Scorer:
    """``scorer(images, prompts) -> (B,)`` scores, one per (image, prompt) pair. Subclasses set :attr:`key` and
    :attr:`title` and implement :meth:`score`."""

    key: str = ''
    title: str = ''

    def score(self, images: Sequence['Image.Image'], prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: Sequence['Image.Image'], prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f'{self.title}: {len(images)} images but {len(prompts)} prompts')
        return self.score(images, prompts)


class CLIPScorer(Scorer):
    """Cosine similarity of CLIP embeddings.

    Args:
        model (str): Local folder or hub id of a ``transformers`` CLIP model (with its processor).
        device: Where to run. Default: CPU.
        allow_download (bool): Allow the hub; by default only the local cache is read.
    """

    key, title = 'clip', 'CLIP'
    what = 'CLIP score'

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device=None, allow_download: bool = False,
                 processor: Optional[str] = None):
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device or 'cpu')
        local = not allow_download
        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=local).to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(processor or model, local_files_only=local,
                                                           use_fast=False)
        except Exception as e:  # noqa: BLE001 - any load failure means "skip, and say why"
            where = 'the local folder' if Path(model).is_dir() else 'the local Hugging Face cache'
            raise MetricUnavailable(f'cannot load {processor or model!r} / {model!r} from {where} ({_first_line(e)}); '
                                    'pass a local folder, or --allow-downloads when online') from None

    @torch.no_grad()
    def _cosine(self, images, prompts) -> torch.Tensor:
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors='pt', padding=True,
                                truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs['pixel_values'])
        txt = self.model.get_text_features(input_ids=inputs['input_ids'], attention_mask=inputs.get('attention_mask'))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1).float().cpu()

    def score(self, images, prompts):
        return self._cosine(images, prompts)


class PickScorer(CLIPScorer):
    """PickScore: ``logit_scale * cosine`` of the PickScore CLIP model."""

    key, title = 'pick', 'Pick'
    what = 'PickScore'

    def __init__(self, model: str = DEFAULT_PICKSCORE_MODEL, device=None, allow_download: bool = False,
                 processor: Optional[str] = DEFAULT_PICKSCORE_PROCESSOR):
        super().__init__(model, device, allow_download, processor)

    def score(self, images, prompts):
        return self.model.logit_scale.exp().float().cpu() * self._cosine(images, prompts)


def _hub_file_cached(repo: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # noqa: BLE001
        return False


class HPSv2Scorer(Scorer):
    """HPSv2 through the ``hpsv2`` package (weights ``xswu/HPSv2`` and the open_clip ViT-H-14 from the HF cache)."""

    key, title = 'hpsv2', 'HPSv2'
    what = 'HPSv2'

    def __init__(self, version: str = 'v2.1', device=None, allow_download: bool = False):
        if importlib.util.find_spec('hpsv2') is None:
            raise MetricUnavailable('the hpsv2 package is not installed (pip install hpsv2)')
        weights = {'v2.0': 'HPS_v2_compressed.pt', 'v2.1': 'HPS_v2.1_compressed.pt'}.get(version)
        if weights is None:
            raise MetricUnavailable(f'unknown HPS version {version!r} (v2.0 or v2.1)')
        missing = [f'{r}/{f}' for r, f in (('xswu/HPSv2', weights),
                                           ('laion/CLIP-ViT-H-14-laion2B-s32B-b79K', 'open_clip_pytorch_model.bin'))
                   if not _hub_file_cached(r, f)]
        if missing and not allow_download:
            raise MetricUnavailable(f'HPSv2 weights are not in the Hugging Face cache: {missing}')
        self.version = version
        try:
            import hpsv2

            self._hpsv2 = hpsv2
        except Exception as e:  # noqa: BLE001
            raise MetricUnavailable(f'importing hpsv2 failed ({_first_line(e)})') from None

    def score(self, images, prompts):
        out = [float(self._hpsv2.score(img, prompt, hps_version=self.version)[0]) for img, prompt in
               zip(images, prompts)]
        return torch.tensor(out)


class ImageRewardScorer(Scorer):
    """ImageReward-v1.0 through the ``image-reward`` package (weights in ``~/.cache/ImageReward``)."""

    key, title = 'image_reward', 'ImageReward'
    what = 'ImageReward'

    def __init__(self, device=None, allow_download: bool = False, cache: Optional[str] = None):
        if importlib.util.find_spec('ImageReward') is None:
            raise MetricUnavailable('the image-reward package is not installed (pip install image-reward)')
        root = Path(cache or Path.home() / '.cache' / 'ImageReward')
        missing = [f for f in ('ImageReward.pt', 'med_config.json') if not (root / f).is_file()]
        if missing and not allow_download:
            raise MetricUnavailable(f'ImageReward weights are not in {root}: missing {missing}')
        try:
            import ImageReward as RM

            self.model = RM.load('ImageReward-v1.0', device=str(device or 'cpu'), download_root=str(root))
        except Exception as e:  # noqa: BLE001
            raise MetricUnavailable(f'loading ImageReward failed ({_first_line(e)})') from None

    @torch.no_grad()
    def score(self, images, prompts):
        return torch.tensor([float(self.model.score(prompt, img)) for img, prompt in zip(images, prompts)])
