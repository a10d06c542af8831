"""The bare PyTorch loop of ``bench/overhead.py`` reproduces Composer's training batch bit for bit.

If it did not, the overhead it measures would compare different work. Tiny FLUX with IDA, ISG and the VFM
discriminator on; batch 0 has a generator and a critic phase (so every algorithm runs), batches 1-2 a critic phase.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def overhead():
    sys.path.insert(0, str(REPO / 'bench'))
    try:
        import overhead as module
        yield module
    finally:
        sys.path.remove(str(REPO / 'bench'))


def test_bare_loop_matches_composer_bit_for_bit(overhead):
    cfg = overhead.load_run_config(REPO / 'yamls' / 'tiny_flux.yaml', ['trainer.progress_bar=false'])
    assert set(cfg['algorithms']) == {'ida', 'isg', 'vfm_discriminator'}
    _, composer_state, _ = overhead.composer_run(cfg, 3)
    marks, bare_state, initial, _ = overhead.bare_run(cfg, 3)

    assert len(marks) == 3
    assert int(bare_state['batches_seen']) == 3
    assert any(k.startswith('discriminator.') for k in bare_state)  # the heads are compared too
    for prefix in ('generator.', 'fake_score.', 'discriminator.'):  # each network trained: not a trivial equality
        assert any(not torch.equal(initial[k], bare_state[k]) for k in bare_state if k.startswith(prefix)), prefix
    overhead.assert_identical(composer_state, bare_state)
