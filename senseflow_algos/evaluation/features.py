"""Pluggable image feature networks for FID-T and Patch FID-T.

* ``'inception'``: the standard FID Inception (torch-fidelity's port, through torchmetrics) when torch-fidelity and
  its weights are in the torch hub cache; else torchvision's ImageNet Inception-v3 when its weights are cached (pool
  features, close to but not the same network as the FID one). Nothing is downloaded unless asked.
* ``'random'``: a small random-weight conv net with a fixed seed, for tests and smoke runs only (its numbers are not
  comparable with published FIDs).

When no Inception weights are available, :func:`build_feature_extractor` raises :class:`MetricUnavailable` whose
message says what is missing and where it was looked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ['MetricUnavailable', 'FeatureExtractor', 'RandomConvFeatures', 'TorchvisionInceptionFeatures',
           'FIDInceptionFeatures', 'FEATURE_EXTRACTORS', 'build_feature_extractor', 'hub_checkpoint']

#: torch-fidelity's FID Inception weights (the TF FID network ported to PyTorch).
FID_INCEPTION_FILE = 'weights-inception-2015-12-05-6726825d.pth'


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (package or weights missing); the message says which and why."""


def hub_checkpoint(filename: str) -> Path:
    """Where ``torch.hub`` caches a downloaded checkpoint file (``$TORCH_HOME/hub/checkpoints/<filename>``)."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / filename


class FeatureExtractor(nn.Module):
    """``(B, 3, H, W)`` images in [0, 1] -> ``(B, D)`` float features. Subclasses set :attr:`name` and :attr:`dim`."""

    name: str = ''
    dim: int = 0
    #: Whether FIDs from this network are comparable with published ones.
    standard: bool = False


class RandomConvFeatures(FeatureExtractor):
    """A seeded random-weight conv net (tests and smoke runs; not comparable with published FIDs).

    Args:
        dim (int): Feature size. Default: ``64``.
        seed (int): Weight seed. Default: ``0``.
        input_size (int): Images are resized to this square side first. Default: ``64``.
    """

    name = 'random'

    def __init__(self, dim: int = 64, seed: int = 0, input_size: int = 64):
        super().__init__()
        self.dim, self.input_size = dim, input_size
        rng = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=rng) * (0.5 if p.ndim > 1 else 0.1))
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode='bilinear',
                          align_corners=False, antialias=True)
        return self.net(x * 2 - 1)


class TorchvisionInceptionFeatures(FeatureExtractor):
    """torchvision's ImageNet Inception-v3, 2048-d pool features at 299x299 (weights from the torch hub cache)."""

    name = 'inception-torchvision'
    dim = 2048

    def __init__(self, allow_download: bool = False):
        super().__init__()
        from torchvision.models import Inception_V3_Weights, inception_v3

        weights = Inception_V3_Weights.IMAGENET1K_V1
        file = hub_checkpoint(Path(weights.url).name)
        if not file.is_file() and not allow_download:
            raise MetricUnavailable(f'torchvision Inception-v3 weights are not in the torch hub cache ({file})')
        self.net = inception_v3(weights=weights)
        self.net.fc = nn.Identity()
        self.requires_grad_(False).eval()
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode='bilinear', align_corners=False)
        return self.net((x - self.mean) / self.std)


class FIDInceptionFeatures(FeatureExtractor):
    """The standard FID Inception (torch-fidelity weights through torchmetrics), 2048-d pool features."""

    name = 'inception-fid'
    dim = 2048
    standard = True

    def __init__(self, allow_download: bool = False):
        super().__init__()
        if importlib.util.find_spec('torch_fidelity') is None:
            raise MetricUnavailable('torch-fidelity is not installed (pip install torch-fidelity)')
        file = hub_checkpoint(FID_INCEPTION_FILE)
        if not file.is_file() and not allow_download:
            raise MetricUnavailable(f'FID Inception weights are not in the torch hub cache ({file})')
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name='inception-v3-compat', features_list=['2048'])
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(images.shape[0], -1).float()


def _inception_auto(allow_download: bool = False) -> FeatureExtractor:
    reasons = []
    for cls in (FIDInceptionFeatures, TorchvisionInceptionFeatures):
        try:
            return cls(allow_download=allow_download)
        except MetricUnavailable as e:
            reasons.append(str(e))
        except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised half-way
            reasons.append(f'{cls.__name__} failed to load: {type(e).__name__}: {e}')
    raise MetricUnavailable('no Inception network available: ' + '; '.join(reasons) +
                            ' (offline? copy the weights into that cache, or pass --allow-downloads)')


#: ``--fid-features`` name -> factory ``(allow_download) -> FeatureExtractor``.
FEATURE_EXTRACTORS: dict[str, Callable[[bool], FeatureExtractor]] = {
    'inception': _inception_auto,
    'inception-fid': lambda allow: FIDInceptionFeatures(allow),
    'inception-torchvision': lambda allow: TorchvisionInceptionFeatures(allow),
    'random': lambda allow: RandomConvFeatures(),
}


def build_feature_extractor(name: str | FeatureExtractor, device: Optional[torch.device | str] = None,
                            allow_download: bool = False) -> FeatureExtractor:
    """The feature network named ``name`` (see :data:`FEATURE_EXTRACTORS`), or ``name`` itself if it is a module.

    Raises:
        MetricUnavailable: When its package or weights are missing.
        ValueError: For an unknown name.
    """
    if isinstance(name, nn.Module):
        return name.to(device) if device is not None else name
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f'--fid-features {name!r} is not known; choose one of {sorted(FEATURE_EXTRACTORS)}')
    net = FEATURE_EXTRACTORS[name](allow_download)
    return net.to(device) if device is not None else net
