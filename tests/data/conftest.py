"""Fixtures of the data tests: example images, the ``data_prep/`` scripts run in-process, MDS datasets built once.

Every Streaming dataset gets a unique ``local`` folder, and stale shared memory is cleaned before each test.
Do not run these tests under pytest-xdist (streaming#884).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_PREP = REPO / 'data_prep'
#: The seed of the tiny configs: precomputed embeddings must come from the tiny weights of this seed.
TINY_SEED = 17
RESOLUTION = 32
NUM_IMAGES = 12


def load_script(name: str) -> ModuleType:
    """``data_prep/<name>.py`` as a module (its ``main(argv)`` runs in this process). ``data_prep/`` goes first on
    ``sys.path``, as when Python runs the script, so it imports its sibling ``mds_writer``."""
    if str(DATA_PREP) not in sys.path:
        sys.path.insert(0, str(DATA_PREP))
    key = f'data_prep_{name}'
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, DATA_PREP / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


@pytest.fixture(scope='session')
def run_script() -> Callable[..., int]:
    """``run_script(name, *argv) -> exit code`` of ``data_prep/<name>.py`` run in-process (no progress bars)."""

    def run(name: str, *argv: str) -> int:
        argv = [str(a) for a in argv]
        if name != 'example_images' and '--help' not in argv:
            argv.append('--no-progress')
        return load_script(name).main(argv)

    return run


@pytest.fixture(autouse=True)
def _clean_shared_memory():
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    logging.getLogger('streaming').setLevel(logging.ERROR)
    yield


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory) -> Path:
    """``NUM_IMAGES`` captioned PNGs (48 px, coloured squares) plus one JPEG, ``.txt`` captions beside them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp('images')
    load_script('example_images').write_example_images(folder, NUM_IMAGES - 1, size=48, seed=0)
    Image.new('RGB', (40, 56), (200, 30, 30)).save(folder / 'sub_jpeg.jpg', quality=90)
    (folder / 'sub_jpeg.txt').write_text('a red rectangle\n', encoding='utf-8')
    return folder


@pytest.fixture(scope='session')
def image_mds(tmp_path_factory, image_folder, run_script) -> Path:
    out = tmp_path_factory.mktemp('mds') / 'images'
    assert run_script('images_to_mds', '--images', image_folder, '--out', out, '--part-size', 5) == 0
    return out


@pytest.fixture(scope='session')
def precomputed(tmp_path_factory, image_mds, run_script) -> Callable[[str], Path]:
    """``precomputed(family) -> folder``: the image MDS with the tiny family's embeddings and latents (made once)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp('pre') / family
            assert run_script('precompute', '--input', image_mds, '--out', out, '--family', family, '--tiny',
                              '--seed', TINY_SEED, '--resolution', RESOLUTION, '--part-size', 5,
                              '--batch-size', 4) == 0
            made[family] = out
        return made[family]

    return get


@pytest.fixture
def local_dir(tmp_path_factory) -> Callable[[], str]:
    """A fresh, unique Streaming cache folder per call."""
    return lambda: str(tmp_path_factory.mktemp('cache'))


def read_dataset(root, kind: str = 'image_caption', batch_size: int = 4, shuffle: bool = False, **kwargs):
    """The dataset of ``build_streaming_dataloader`` over ``root`` (read in place), for direct indexing."""
    from senseflow_algos.data.streaming import build_streaming_dataloader

    kwargs.setdefault('streaming_kwargs', {'num_canonical_nodes': 1})
    loader = build_streaming_dataloader(kind, batch_size=batch_size, resolution=RESOLUTION, remote=str(root),
                                        shuffle=shuffle, **kwargs)
    return loader
