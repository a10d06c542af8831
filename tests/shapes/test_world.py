"""The shapes world: determinism, caption <-> attribute consistency, the grammar, the dataloader."""

import numpy as np
import pytest
import torch

from senseflow_algos.models.tiny_tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer
from senseflow_algos.shapes import world as W


def test_deterministic_per_seed_and_index():
    a, b = W.render_sample(3, 17), W.render_sample(3, 17)
    assert a['prompt'] == b['prompt'] and a['attributes'] == b['attributes']
    assert torch.equal(a['image'], b['image'])
    assert W.render_sample(3, 18)['prompt'] != a['prompt'] or not torch.equal(W.render_sample(3, 18)['image'],
                                                                                a['image'])
    assert not torch.equal(W.render_sample(4, 17)['image'], a['image'])
    ds = W.ShapesDataset(10, seed=3, offset=10)
    assert torch.equal(ds[7]['image'], a['image'])


def test_image_range_and_background():
    s = W.render_sample(0, 0)
    img = s['image']
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    corner_bg = torch.tensor(W.BACKGROUND) * 2 - 1
    # most pixels are background
    is_bg = (img - corner_bg.view(3, 1, 1)).abs().amax(0) < 1e-4
    assert 0.4 < is_bg.float().mean() < 0.99


@pytest.mark.parametrize('index', range(200))
def test_caption_matches_attributes(index):
    scene = W.sample_scene(11, index)
    parsed = W.parse_caption(scene.caption)
    objs = scene.objects
    assert parsed['objects'] == [(o.colour, o.shape) for o in objs]
    assert parsed['position'] == scene.position and parsed['relation'] == scene.relation
    r = W.RESOLUTION
    for o in objs:  # inside the image
        assert o.size <= o.x <= r - o.size and o.size <= o.y <= r - o.size
    if scene.position:
        axis, side = W.POSITIONS[scene.position]
        c = (objs[0].x, objs[0].y)[axis]
        assert (c - r / 2) * side > 0
    if len(objs) == 2:
        a, b = objs
        assert (a.colour, a.shape) != (b.colour, b.shape)
        assert max(abs(a.x - b.x), abs(a.y - b.y)) >= a.size + b.size  # boxes do not overlap
        axis, sign = W.RELATIONS[scene.relation]
        if axis >= 0:
            d = ((a.x, a.y)[axis] - (b.x, b.y)[axis]) * sign
            assert d >= a.size + b.size


def test_object_colours_are_rendered_at_their_centres():
    for i in range(50):
        scene = W.sample_scene(5, i)
        img = W.render(scene)
        for o in scene.objects:
            px = img[:, int(o.y + (0.4 * o.size if o.shape == 'triangle' else 0)), int(o.x)]
            assert np.abs(px - np.array(o.rgb)).max() < 0.05, (scene.caption, o)


def test_both_scene_kinds_and_all_phrases_occur():
    scenes = [W.sample_scene(0, i) for i in range(600)]
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.relation for s in scenes if s.relation} == set(W.RELATIONS)
    assert {s.position for s in scenes if s.position} == set(W.POSITIONS)
    assert {o.colour for s in scenes for o in s.objects} == set(W.COLOURS)
    assert {o.shape for s in scenes for o in s.objects} == set(W.SHAPES)
    assert {len(W.sample_scene(0, i, num_objects=2).objects) for i in range(20)} == {2}


def test_grammar_round_trip_and_rejects_other_text():
    for i in range(100):
        scene = W.sample_scene(2, i)
        p = W.parse_caption(scene.caption)
        objs = [W.ShapeObject(c, s, 0, 0, 1) for c, s in p['objects']]
        assert W.caption_of(objs, p['position'], p['relation']) == scene.caption
    for bad in ('a red star', 'red circle', 'a red circle near a blue square', 'a red circle on the middle'):
        with pytest.raises(ValueError):
            W.parse_caption(bad)


def test_vocabulary_is_single_tokens_of_tiny_tokenizers():
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    words = {w for i in range(400) for w in W.sample_scene(1, i).caption.split()}
    for w in words:
        assert len(clip(w, add_special_tokens=False).input_ids) == 1, w
        assert t5(w, add_special_tokens=False).input_ids != [t5.unk_token_id], w


def test_iterable_and_loader():
    it = iter(W.ShapesIterableDataset(seed=2, start=5))
    assert next(it)['prompt'] == W.render_sample(2, 5)['prompt']
    loader = W.build_shapes_dataloader(batch_size=4, num_samples=16, seed=2)
    batch = next(iter(loader))
    assert batch['image'].shape == (4, 3, 32, 32) and len(batch['prompt']) == 4
    assert batch['prompt'][1] == W.render_sample(2, 1)['prompt']
