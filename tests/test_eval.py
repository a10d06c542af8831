"""Evaluation: Fréchet distance, prompt files, patches, feature / metric availability messages, and ``eval.py`` end
to end on tiny pipelines with a random-weight feature network and a tiny random CLIP (resumable, per-image seeds)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from senseflow_algos.evaluation import (
    EvalError,
    MetricUnavailable,
    RandomConvFeatures,
    build_feature_extractor,
    evaluate,
    fid_from_features,
    format_table,
    frechet_distance,
    load_prompts,
    main,
    random_patches,
)
from senseflow_algos.evaluation.generation import image_path
from senseflow_algos.evaluation.scores import CLIPScorer, HPSv2Scorer, ImageRewardScorer

PROMPTS = ['a red circle', 'a blue square above a green star', 'a small yellow triangle', 'a large purple hexagon']


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    many = rng.normal(size=(400, 16))
    assert abs(fid_from_features(many, many)) < 1e-8
    few = rng.normal(size=(6, 64))  # fewer samples than dimensions: singular covariance
    assert abs(fid_from_features(few, few)) < 1e-3
    feats = RandomConvFeatures()(torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert abs(fid_from_features(feats, feats)) < 1e-3


def test_frechet_distance_matches_the_closed_form():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == \
        pytest.approx(4.0 + 1.0)
    # Diagonal covariances: sum over dimensions.
    fd = frechet_distance(np.zeros(2), np.diag([1.0, 9.0]), np.ones(2), np.diag([4.0, 1.0]))
    assert fd == pytest.approx(2.0 + 1.0 + 4.0)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 0.5
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-6)
    assert fid_from_features(a, b) > 1.5
    with pytest.raises(ValueError, match='N >= 2'):
        fid_from_features(a[:1], b)


def test_random_patches_are_paired_by_image_index():
    images = torch.rand(3, 3, 32, 32)
    a = random_patches(images, [5, 6, 7], patch_size=8, per_image=2, seed=0)
    b = random_patches(images.flip(0), [7, 6, 5], patch_size=8, per_image=2, seed=0)
    assert a.shape == (6, 3, 8, 8)
    torch.testing.assert_close(a[:2], b[4:])  # image index 5: same crops wherever it sits in the batch
    with pytest.raises(ValueError, match='larger than the images'):
        random_patches(images, [0, 1, 2], patch_size=64)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files and availability messages


def test_prompt_files(tmp_path):
    (tmp_path / 'p.txt').write_text('a\n\n b \n')
    assert load_prompts(tmp_path / 'p.txt') == ['a', 'b']
    (tmp_path / 'p.json').write_text(json.dumps(['x', {'caption': 'y'}]))
    assert load_prompts(tmp_path / 'p.json') == ['x', 'y']
    coco = {'annotations': [{'image_id': 1, 'id': 1, 'caption': 'one'}, {'image_id': 1, 'id': 2, 'caption': 'uno'},
                            {'image_id': 2, 'id': 3, 'caption': 'two'}]}
    (tmp_path / 'coco.json').write_text(json.dumps(coco))
    assert load_prompts(tmp_path / 'coco.json') == ['one', 'two']
    (tmp_path / 'p.jsonl').write_text('{"prompt": "p1"}\n"p2"\n')
    assert load_prompts(tmp_path / 'p.jsonl', limit=1) == ['p1']
    (tmp_path / 'p.csv').write_text('id,caption\n1,c1\n2,c2\n')
    assert load_prompts(tmp_path / 'p.csv') == ['c1', 'c2']
    with pytest.raises(FileNotFoundError, match='nope.txt'):
        load_prompts(tmp_path / 'nope.txt')
    (tmp_path / 'bad.jsonl').write_text('{"prompt": "ok"}\n{"title": 3}\n')
    with pytest.raises(ValueError, match='bad.jsonl line 2'):
        load_prompts(tmp_path / 'bad.jsonl')
    with pytest.raises(ValueError, match="'.yaml'"):
        load_prompts(tmp_path / 'p.yaml') if (tmp_path / 'p.yaml').write_text('x') else None


def test_missing_weights_give_a_clear_skip_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    with pytest.raises(MetricUnavailable, match='no Inception network available.*hub'):
        build_feature_extractor('inception')
    with pytest.raises(ValueError, match='not known'):
        build_feature_extractor('resnet')
    with pytest.raises(MetricUnavailable, match='cannot load'):
        CLIPScorer(str(tmp_path / 'no-clip'))
    for cls in (HPSv2Scorer, ImageRewardScorer):
        try:
            cls()
        except MetricUnavailable as e:
            assert 'pip install' in str(e) or 'cache' in str(e) or 'not in' in str(e)


def test_table_layout_is_the_papers():
    rows = [{'name': 'Teacher', 'role': 'teacher', 'nfe': 100, 'metrics': {'clip': 0.331}},
            {'name': 'Ours', 'role': 'student', 'nfe': 4,
             'metrics': {'fid_t': 13.38, 'patch_fid_t': 17.48, 'clip': 0.3286, 'pick': 23.01}}]
    table = format_table(rows, {'HPSv2': 'not installed'})
    lines = table.splitlines()
    assert lines[0] == ('| Method | NFE | FID-T ↓ | Patch FID-T ↓ | CLIP ↑ | HPSv2 ↑ | Pick ↑ | ImageReward ↑ |')
    assert lines[2] == '| Teacher | 100 | -- | -- | 0.3310 | n/a | n/a | n/a |'
    assert lines[3] == '| Ours | 4 | 13.38 | 17.48 | 0.3286 | n/a | 23.01 | n/a |'
    assert '- n/a HPSv2: not installed' in table


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """A tiny FLUX teacher folder, an exported student of the same family, a tiny CLIP and a prompt file."""
    from senseflow_algos.evaluation.tiny import save_tiny_clip
    from senseflow_algos.export import export_pipeline
    from senseflow_algos.models.factory import build_dmd_model
    from senseflow_algos.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp('eval_assets')
    teacher = save_tiny_pipeline('flux', root / 'teacher', seed=0)
    student = export_pipeline(build_dmd_model('flux', resolution=32, tiny=True, seed=0), root / 'student')
    clip = save_tiny_clip(root / 'clip')
    prompts = root / 'prompts.txt'
    prompts.write_text('\n'.join(PROMPTS) + '\n')
    return {'teacher': teacher, 'student': student, 'clip': clip, 'prompts': prompts}


def test_eval_end_to_end_resumable(assets, tmp_path, capsys):
    out = tmp_path / 'eval'
    result = evaluate(
        str(assets['teacher']), [str(assets['student']), str(assets['teacher'])], str(assets['prompts']), str(out),
        names=['student', 'teacher-as-student'], methods=('renoise', 'euler'), batch_size=3,
        teacher_kwargs={'num_inference_steps': 4, 'guidance_scale': 3.5},
        student_kwargs={'num_inference_steps': 4, 'guidance_scale': 3.5}, fid_features=RandomConvFeatures(),
        patch_size=16, patches_per_image=2, clip_model=str(assets['clip']), pickscore_model=str(assets['clip']),
        pickscore_processor=str(assets['clip']), progress=False)
    rows = {r['name']: r for r in result['rows']}
    assert list(rows) == ['Teacher', 'student', 'student (Euler)', 'teacher-as-student']
    for folder in ('teacher', 'student', 'student_Euler', 'teacher-as-student'):
        assert sorted(p.name for p in (out / folder).glob('*.png')) == [f'{i:05d}.png' for i in range(4)]
    assert rows['Teacher']['nfe'] == 4 and rows['student']['nfe'] == 4
    # The teacher pipeline run as a "student" makes the same images: FID-T against itself is about 0.
    assert abs(rows['teacher-as-student']['metrics']['fid_t']) < 1e-3
    assert abs(rows['teacher-as-student']['metrics']['patch_fid_t']) < 1e-3
    for name in ('student', 'student (Euler)'):
        m = rows[name]['metrics']
        assert m['fid_t'] > 1e-4 and np.isfinite(m['patch_fid_t'])  # other images: clearly above the ~1e-6 of a set vs itself
        assert -1 <= m['clip'] <= 1 and 'pick' in m
    assert 'fid_t' not in rows['Teacher']['metrics']
    # HPSv2 / ImageReward: skipped with the reason (their packages are not installed here), never a crash.
    skipped = result['skipped']
    assert {'HPSv2', 'ImageReward'} <= set(skipped) or 'hpsv2' in rows['student']['metrics']
    md = (out / 'results.md').read_text()
    assert md.startswith('| Method | NFE | FID-T ↓ | Patch FID-T ↓ | CLIP ↑ | HPSv2 ↑ | Pick ↑ | ImageReward ↑ |')
    assert '| Teacher | 4 | -- | -- |' in md
    data = json.loads((out / 'results.json').read_text())
    assert [r['name'] for r in data['rows']] == list(rows) and data['settings']['num'] == 4
    assert 'will be skipped' in capsys.readouterr().out or not skipped

    # Resume through the command line with another batch size: only the deleted image is made again, and it is the
    # same image (one seed per image), so every number is unchanged.
    image_path(out / 'student', 2).unlink()
    before = {r['name']: r['metrics'] for r in data['rows']}
    code = main(['--teacher', str(assets['teacher']), '--student', str(assets['student']), '--student',
                 str(assets['teacher']), '--names', 'student', 'teacher-as-student', '--prompts',
                 str(assets['prompts']), '--out', str(out), '--methods', 'renoise,euler', '--batch-size', '1',
                 '--teacher-steps', '4', '--teacher-guidance', '3.5', '--student-guidance', '3.5',
                 '--fid-features', 'random', '--patch-size', '16', '--patches-per-image', '2', '--clip-model',
                 str(assets['clip']), '--pickscore-model', str(assets['clip']), '--pickscore-processor',
                 str(assets['clip']), '--no-progress'])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'student: 1 generated, 3 already there' in printed and 'Teacher: 0 generated, 4 already there' in printed
    after = {r['name']: r['metrics'] for r in json.loads((out / 'results.json').read_text())['rows']}
    for name in before:
        for key, value in before[name].items():
            assert after[name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_eval_refuses_to_mix_settings_and_names_bad_inputs(assets, tmp_path, capsys):
    out = tmp_path / 'eval'
    common = ['--teacher', str(assets['teacher']), '--student', str(assets['student']), '--prompts',
              str(assets['prompts']), '--out', str(out), '--num', '2', '--fid-features', 'random', '--clip-model',
              'none', '--pickscore-model', 'none', '--no-hpsv2', '--no-image-reward', '--no-progress']
    assert main(common + ['--teacher-steps', '2']) == 0
    assert main(common + ['--teacher-steps', '3']) == 2
    err = capsys.readouterr().err
    assert 'other settings' in err and 'teacher' in err
    assert main(common + ['--methods', 'heun']) == 2
    assert "'heun'" in capsys.readouterr().err
    with pytest.raises(EvalError, match='neither a diffusers pipeline folder'):
        evaluate(str(assets['teacher']), [str(tmp_path)], str(assets['prompts']), str(tmp_path / 'e2'),
                 fid_features='random', clip_model=None, pickscore_model=None, hpsv2=False, image_reward=False,
                 progress=False)


def test_exported_student_images_equal_the_pipeline_call(assets, tmp_path):
    """eval.py samples exported students with the in-repo sampler; with the default generator that is exactly what
    ``pipe(prompt, **call_kwargs)`` makes."""
    from diffusers import DiffusionPipeline

    from senseflow_algos.evaluation.generation import open_source
    from senseflow_algos.export import pipeline_call_kwargs
    from senseflow_algos.sampling import sample, seeded_default_rng

    source = open_source(Path(assets['student']), 'student', device='cpu')
    ours = sample(source.components, PROMPTS[:2], rng=seeded_default_rng(7)).images
    pipe = DiffusionPipeline.from_pretrained(str(assets['student']))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS[:2], generator=seeded_default_rng(7), output_type='pt',
                  **pipeline_call_kwargs(assets['student'])).images
    assert (ours - theirs).abs().max().item() <= 1e-5
    source.close()


def test_eval_diversity_is_a_ratio_to_the_teacher(assets, tmp_path):
    out = tmp_path / 'eval'
    result = evaluate(
        str(assets['teacher']), [str(assets['student']), str(assets['teacher'])], str(assets['prompts']), str(out),
        names=['student', 'teacher-as-student'], batch_size=4, teacher_kwargs={'num_inference_steps': 4},
        student_kwargs={'num_inference_steps': 4}, fid_features=RandomConvFeatures(), patch_size=16,
        clip_model=None, pickscore_model=None, hpsv2=False, image_reward=False, progress=False,
        diversity_seeds=3, diversity_prompts=2)
    rows = {r['name']: r['metrics'] for r in result['rows']}
    assert rows['Teacher']['diversity'] == 1.0
    # The teacher pipeline as a student draws the same images from the same seeds: ratio 1.
    assert rows['teacher-as-student']['diversity'] == pytest.approx(1.0, abs=1e-9)
    assert np.isfinite(rows['student']['diversity']) and rows['student']['diversity'] > 0
    assert sorted(p.name for p in (out / 'student' / 'diversity').iterdir()) == ['seed0', 'seed1', 'seed2']
    assert len(list((out / 'student' / 'diversity' / 'seed2').glob('*.png'))) == 2
    assert 'Diversity (x teacher)' in result['table'].splitlines()[0]
    with pytest.raises(EvalError, match='at least 2 seeds'):
        evaluate(str(assets['teacher']), [str(assets['student'])], str(assets['prompts']), str(tmp_path / 'x'),
                 diversity_seeds=1, fid_features=RandomConvFeatures(), clip_model=None, pickscore_model=None,
                 hpsv2=False, image_reward=False, progress=False)
