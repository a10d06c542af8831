"""A checkpoint written before issue 17's renames (typed step record, batch counter, ``rng`` names) still loads and
resumes: continued from its batch-3 checkpoint, today's code ends at batch 6 where the old code's uninterrupted run
ended (``tests/fixtures/checkpoint_before_issue17/README.md`` says how both were made).

On the machine that wrote the fixture the resumed run is bit-identical. Float kernels differ between CPU types (the
fixture came from another machine than today's CI), so the comparison is on each network's update from batch 3 to 6:
``||resumed - old|| / ||old - checkpoint||`` must stay under 1e-3 (measured across CPU types: discriminator 1.3e-4,
generator 8.8e-6, fake score 3.4e-6). A resume that loses the optimizer state lands at 0.04 to 0.9, which the second
test checks, so the tolerance separates a right resume from a wrong one. Integer tensors must be equal.
"""

from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / 'fixtures' / 'checkpoint_before_issue17'
#: The batch counter's name in the old checkpoint.
OLD_COUNTER = 'ttur_step'
#: Largest relative error of a network's batch 3 -> 6 update that still counts as the same run.
TOLERANCE = 1e-3


def _resume(tmp_path, extra=()):
    """Today's trainer resumed from the old batch-3 checkpoint and run to batch 6 (one intra-op thread, as the fixture
    was written: float sums depend on the thread count)."""
    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = FIXTURE / 'run_config.yaml'
        cfg = load_config(path, [f'trainer.save_folder={tmp_path}', 'trainer.save_interval=6ba',
                                 f'trainer.load_path={FIXTURE / "ep0-ba3-rank0.pt"}', *extra])
        validate_config(cfg, source=str(path))
        trainer = build_trainer(cfg)
        model = trainer.state.model
        assert int(model.batches_seen) == 3  # the old 'ttur_step' buffer was read under its new name
        trainer.fit()
        assert int(trainer.state.timestamp.batch) == 6
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    return state


def _update_errors(state) -> dict[str, float]:
    """Per network (first key component): relative error of the batch 3 -> 6 update against the old run's."""
    expected = load_file(str(FIXTURE / 'model_ba6.safetensors'))
    assert int(expected.pop(OLD_COUNTER)) == int(state['batches_seen']) == 6
    assert set(expected) <= set(state)
    start = torch.load(FIXTURE / 'ep0-ba3-rank0.pt', map_location='cpu', weights_only=False)['state']['model']
    num, den = defaultdict(float), defaultdict(float)
    for key, old in expected.items():
        if not old.dtype.is_floating_point:
            assert torch.equal(old, state[key]), key
            continue
        net = key.split('.')[0]
        num[net] += (state[key].double() - old.double()).pow(2).sum().item()
        den[net] += (old.double() - start[key].double()).pow(2).sum().item()
    return {net: (num[net] / den[net])**0.5 for net in num if den[net] > 0}


def test_old_checkpoint_resumes_where_the_old_run_went(tmp_path):
    errors = _update_errors(_resume(tmp_path))
    assert {'generator', 'fake_score', 'discriminator'} <= set(errors)
    assert max(errors.values()) < TOLERANCE, errors


def test_a_resume_without_the_optimizer_state_is_caught(tmp_path):
    errors = _update_errors(_resume(tmp_path, ['trainer.load_ignore_keys=[state/optimizers/*]']))
    assert max(errors.values()) > 10 * TOLERANCE, errors
