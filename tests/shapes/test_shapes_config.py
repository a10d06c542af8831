"""A few-batch run of yamls/shapes.yaml: the shipped teacher and VFM, full SenseFlow, the report and the export."""

import json
import math

import pytest
import torch

from senseflow_algos.shapes import components as C

pytestmark = pytest.mark.skipif(not ((C.TEACHER_DIR / 'model_index.json').exists() and C.VFM_WEIGHTS.exists()
                                     and C.EVALUATOR_WEIGHTS.exists()), reason='shapes assets not shipped')


def test_shapes_config_trains_reports_and_exports(make_trainer, tmp_path):
    report = tmp_path / 'report'
    trainer, rec = make_trainer('shapes', [
        'trainer.max_duration=2ba', 'model.gen_every=1', 'dataset.global_batch_size=2',
        f'model.pretrained={C.TEACHER_DIR}',
        f'algorithms.vfm_discriminator.backbone_kwargs.pretrained_cfg_overlay.file={C.VFM_WEIGHTS}',
        'callbacks.shapes_report.num_prompts=8', 'callbacks.shapes_report.full_steps=3',
        'callbacks.shapes_report.diversity_prompts=4', 'callbacks.shapes_report.diversity_seeds=3',
        f'callbacks.shapes_report.folder={report}', 'callbacks.shapes_report.cache=',
        f'callbacks.export_pipeline.folder={tmp_path / "export"}'])
    model = trainer.state.model
    assert model.vfm_backbone.model.patch_embed.patch_size == (4, 4)
    # The VFM backbone carries the shipped pretrained weights, not a random init.
    from safetensors.torch import load_file

    shipped = load_file(str(C.VFM_WEIGHTS))
    assert torch.equal(model.vfm_backbone.model.pos_embed, shipped['pos_embed'])
    trainer.fit()
    trainer.close()
    assert len(rec.losses) == 2
    first = rec.losses[0]
    for key in ('generator/dmd', 'generator/isg', 'generator/adversarial', 'fake_score/flow_matching'):
        assert any(key in k for k in first), (key, sorted(first))
    assert all(math.isfinite(v) for losses in rec.losses for v in losses.values())
    data = json.loads((report / 'report.json').read_text())
    assert set(data['rows']) == {'teacher 3-step Euler', 'teacher 4-step Euler', 'student 4-step'}
    # Diversity over 3 seeds of 4 prompts, as a ratio to the teacher's full-step row (1 by definition there).
    assert data['diversity'] == {'prompts': 4, 'seeds': 3, 'features': 'shapes evaluator'}
    assert data['rows']['teacher 3-step Euler']['diversity_ratio'] == 1.0
    assert all(r['diversity'] > 0 for r in data['rows'].values())
    assert 'diversity (x teacher)' in (report / 'report.md').read_text()
    assert all(0 <= r['geometry']['single'] <= 1 for r in data['rows'].values())
    assert data['renderer']['geometry']['single'] >= 0.75  # the renderer's own 8 images, by pixel geometry
    assert (report / 'samples.png').is_file() and (report / 'report.md').is_file()
    assert (tmp_path / 'export' / 'model_index.json').is_file()
