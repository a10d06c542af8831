"""The teacher's caption-structure read-out (shapes/text_probe.py): labels by hand, loss and position-free read-out."""

import torch

from senseflow_algos.shapes.text_probe import FIELDS, TextProbe, caption_labels


def test_caption_labels_by_hand():
    got = caption_labels(['a red circle above a blue square', 'a cyan triangle on the left', 'a green square', ''])
    # FIELDS: colour_1 (red green blue yellow purple cyan), shape_1 (circle square triangle), colour_2 ('none' first),
    # shape_2 ('none' first), place ('none', left right top bottom, above below 'to the left of' 'to the right of'
    # 'and').
    assert got.tolist() == [[0, 0, 3, 2, 5], [5, 2, 0, 0, 1], [1, 1, 0, 0, 0], [-1, -1, -1, -1, -1]]
    assert FIELDS['place'][9] == 'and'


def test_probe_reads_a_set_of_tokens():
    """Permuting the T5 tokens leaves the read-out unchanged (FLUX gives every text token the same position)."""
    torch.manual_seed(0)
    probe = TextProbe(t5_width=8, clip_width=4, heads=2).eval()
    cond = {'prompt_embeds': torch.randn(3, 5, 8), 'pooled_prompt_embeds': torch.randn(3, 4)}
    shuffled = {**cond, 'prompt_embeds': cond['prompt_embeds'][:, torch.tensor([4, 2, 0, 3, 1])]}
    for a, b in zip(probe(cond)[0], probe(shuffled)[0]):
        assert torch.allclose(a, b, atol=1e-6)


def test_probe_loss_ignores_empty_captions_and_learns():
    torch.manual_seed(0)
    probe = TextProbe(t5_width=8, clip_width=4, heads=2)
    labels = caption_labels(['a red circle above a blue square', ''])
    cond = {'prompt_embeds': torch.randn(2, 5, 8), 'pooled_prompt_embeds': torch.randn(2, 4)}
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss, accuracy = probe.loss(cond, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.1 * first and accuracy == 1.0
