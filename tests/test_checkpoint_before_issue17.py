"""A checkpoint written before issue 17's renames (typed step record, batch counter, ``rng`` names) still loads and
resumes: continued from its batch-3 checkpoint, today's code ends at batch 6 bit-identical to the model state the
old code's uninterrupted run saved (``tests/fixtures/checkpoint_before_issue17/README.md`` says how both were made)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / 'fixtures' / 'checkpoint_before_issue17'
#: The batch counter's name in the old checkpoint.
OLD_COUNTER = 'ttur_step'


def test_old_checkpoint_resumes_bit_identically(tmp_path):
    # The fixture was written with one intra-op thread (float sums depend on the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_and_compare(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_and_compare(tmp_path):
    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config

    path = FIXTURE / 'run_config.yaml'
    cfg = load_config(path, [f'trainer.save_folder={tmp_path}', 'trainer.save_interval=6ba',
                             f'trainer.load_path={FIXTURE / "ep0-ba3-rank0.pt"}'])
    validate_config(cfg, source=str(path))
    trainer = build_trainer(cfg)
    model = trainer.state.model
    assert int(model.batches_seen) == 3  # the old 'ttur_step' buffer was read under its new name
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 6
    expected = load_file(str(FIXTURE / 'model_ba6.safetensors'))
    assert int(expected.pop(OLD_COUNTER)) == int(model.batches_seen) == 6
    state = model.state_dict()
    assert set(expected) <= set(state)
    changed = [k for k in expected if not torch.equal(expected[k], state[k])]
    assert not changed, f'{len(changed)} of {len(expected)} tensors differ from the old run, e.g. {changed[:3]}'
    trainer.close()
