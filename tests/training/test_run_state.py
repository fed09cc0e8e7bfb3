"""peft_m2ist.training.run_state: the state a checkpoint records, and where a resumed run picks up."""

from __future__ import annotations

import json
import time

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from peft_m2ist.training.run_state import RunState, epoch_to_evaluate_first, resumed_batches


def test_the_run_state_round_trips_through_its_file_and_keeps_counting_time(tmp_path):
    state = RunState(step=9, evaluated_epoch=0, history=[{"epoch": 0, "step": 6, "accuracy": 0.25}],
                     best={"epoch": 0, "step": 6, "accuracy": 0.25}, skipped_steps=2, elapsed_s=100.0,
                     started=time.monotonic() - 5)
    saved = state.to_json()
    assert saved.keys() == {"step", "evaluated_epoch", "history", "best", "skipped_steps", "elapsed_s"}
    assert 105 <= saved["elapsed_s"] < 120
    (tmp_path / "run_state.json").write_text(json.dumps(saved))
    now = time.monotonic()
    loaded = RunState.from_checkpoint(tmp_path, started=now)
    assert (loaded.step, loaded.evaluated_epoch, loaded.history, loaded.best) == (9, 0, state.history, state.best)
    assert loaded.skipped_steps == 2
    assert loaded.elapsed_s == saved["elapsed_s"] and loaded.started == now
    assert loaded.elapsed() >= saved["elapsed_s"]


def test_a_fresh_run_state_has_no_history_and_no_best_score():
    state, other = RunState(), RunState()
    assert (state.step, state.evaluated_epoch, state.history, state.best) == (0, -1, [], None)
    state.history.append({"epoch": 0})
    assert other.history == []  # not shared between instances


def test_a_run_state_without_a_best_evaluation_reads_back_as_none(tmp_path):
    """Saved before the first evaluation: `best` is null (or, by older versions, the placeholder accuracy -1)."""
    for best in (None, {"accuracy": -1}):
        (tmp_path / "run_state.json").write_text(json.dumps(
            {"step": 2, "evaluated_epoch": -1, "history": [], "best": best, "elapsed_s": 1.0}))
        loaded = RunState.from_checkpoint(tmp_path, started=0.0)
        assert loaded.best is None and loaded.skipped_steps == 0


def test_a_damaged_or_foreign_run_state_is_named_in_the_error(tmp_path):
    path = tmp_path / "run_state.json"
    path.write_text('{"step": 12, "hist')
    with pytest.raises(ValueError, match=r"run_state\.json is not valid JSON .*resume from another checkpoint"):
        RunState.from_checkpoint(tmp_path, started=0.0)
    path.write_text(json.dumps({"step": 12}))
    with pytest.raises(ValueError, match=r"run_state\.json: not a run state of this script \(KeyError"):
        RunState.from_checkpoint(tmp_path, started=0.0)


@pytest.mark.parametrize(("step", "expected"), [(0, (0, 0)), (4, (0, 4)), (6, (1, 0)), (9, (1, 3)), (12, (2, 0))])
def test_position_is_the_epoch_and_the_batches_already_seen(step, expected):
    assert RunState(step=step).position(steps_per_epoch=6) == expected
    epoch, batches = expected
    assert RunState(step=step).position(6, gradient_accumulation_steps=2) == (epoch, 2 * batches)


def test_an_epoch_trained_but_not_evaluated_at_the_checkpoint_is_evaluated_first():
    """6 steps an epoch, 12 in all (or 10 with --max_train_steps)."""
    cases = {
        (0, 12, -1): None,  # nothing trained yet
        (4, 12, -1): None,  # mid-epoch 0
        (6, 12, -1): 0,  # saved on epoch 0's last step, before its evaluation
        (6, 12, 0): None,  # ... already evaluated
        (9, 12, 0): None,
        (12, 12, 0): 1,  # the run's last step
        (10, 10, 0): 1,  # the run's last step, mid-epoch (--max_train_steps)
        (12, 12, 1): None,
    }
    for (step, total, evaluated), expected in cases.items():
        assert epoch_to_evaluate_first(step, 6, total, evaluated) == expected, (step, total, evaluated)


def test_resumed_batches_skip_the_seen_ones_and_keep_the_restored_rng_state():
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(list(range(10)), batch_size=2, shuffle=True))
    loader.set_epoch(0)
    torch.manual_seed(5)
    straight = [b.tolist() for b in resumed_batches(accelerator, loader, 0)]
    assert sorted(i for b in straight for i in b) == list(range(10))

    torch.manual_seed(5)
    state = torch.get_rng_state()
    iter(loader).__next__()  # starting an iterator draws from the global RNG ...
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    batches = resumed_batches(accelerator, loader, 2)
    assert torch.equal(torch.get_rng_state(), state)  # ... which resumed_batches undoes
    assert [b.tolist() for b in batches] == straight[2:]  # same epoch order (seedable sampler), first two skipped
