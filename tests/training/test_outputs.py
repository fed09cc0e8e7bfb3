"""peft_m2ist.training.output_dir: adapters saved whole, the best adapter restored, a used folder refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate import Accelerator
from earlier_run import write_earlier_run

from peft_m2ist.training.output_dir import (
    earlier_outputs,
    prepare_output_dir,
    restore_best_adapter,
    save_adapter,
    save_best,
)


class FakeAdapter:
    """Stands in for a PeftModel: `save_pretrained` writes one file."""

    def __init__(self, content: str) -> None:
        self.content = content

    def save_pretrained(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "adapter_model.safetensors").write_text(self.content)


def test_an_adapter_is_saved_whole_without_a_towers_file(tmp_path):
    save_adapter(FakeAdapter("v1"), tmp_path / "final_adapter")
    save_adapter(FakeAdapter("v2"), tmp_path / "final_adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_adapter"]
    # the towers travel in the adapter's own config (M2ISTConfig.base_towers), not in a side file
    assert [p.name for p in (tmp_path / "final_adapter").iterdir()] == ["adapter_model.safetensors"]
    assert (tmp_path / "final_adapter" / "adapter_model.safetensors").read_text() == "v2"


def test_the_best_adapter_is_put_back_as_the_checkpoint_saw_it(tmp_path):
    out, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_8"
    save_best(FakeAdapter("as of step 6"), out, {"accuracy": 0.5, "step": 6})
    checkpoint.mkdir(parents=True)
    (checkpoint / "best_adapter").mkdir()
    (checkpoint / "best_adapter" / "adapter_model.safetensors").write_text("as of step 6")
    save_best(FakeAdapter("as of step 12"), out, {"accuracy": 0.75, "step": 12})  # after the checkpoint

    restore_best_adapter(checkpoint, out, {"accuracy": 0.5, "step": 6})
    assert (out / "best_adapter" / "adapter_model.safetensors").read_text() == "as of step 6"
    assert json.loads((out / "best.json").read_text()) == {"accuracy": 0.5, "step": 6}

    restore_best_adapter(out / "checkpoints" / "step_2", out, {"accuracy": -1})  # saved before any evaluation
    assert not (out / "best_adapter").exists() and not (out / "best.json").exists()


def test_earlier_outputs_ignore_empty_folders_and_tracker_logs(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events").write_text("")
    assert earlier_outputs(tmp_path) == []
    write_earlier_run(tmp_path)
    (tmp_path / "final_adapter").mkdir()
    (tmp_path / "final_adapter" / "adapter_model.safetensors").write_text("")
    assert earlier_outputs(tmp_path) == ["checkpoints", "final_adapter", "best.json", "results.json"]


def test_an_output_dir_with_an_earlier_runs_outputs_is_refused_unless_overwritten(tmp_path):
    accelerator = Accelerator(cpu=True)
    out = tmp_path / "run"
    write_earlier_run(out)
    (out / "logs").mkdir()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match=r"checkpoints, best\.json, results\.json.*--overwrite_output_dir"):
        prepare_output_dir(out, None, 0, False, accelerator)
    elsewhere = tmp_path / "other" / "checkpoints" / "step_3"  # resuming another folder's checkpoint: refused too
    with pytest.raises(FileExistsError):
        prepare_output_dir(out, elsewhere, 3, False, accelerator)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched

    prepare_output_dir(out, None, 0, True, accelerator)
    assert [p.name for p in out.iterdir()] == ["logs"]
    prepare_output_dir(tmp_path / "new", None, 0, False, accelerator)  # a new folder is fine


def test_resuming_an_own_checkpoint_drops_what_came_after_it(tmp_path):
    accelerator = Accelerator(cpu=True)
    out = tmp_path / "run"
    write_earlier_run(out)
    (out / "checkpoints" / "step_1600.tmp").mkdir()
    checkpoint = out / "checkpoints" / "step_1400"
    with pytest.raises(ValueError, match=r"would delete .*step_1400"):
        prepare_output_dir(out, checkpoint, 1400, True, accelerator)
    prepare_output_dir(out, checkpoint, 1400, False, accelerator)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1400"]
    assert (out / "best.json").is_file()  # restored separately, from the checkpoint (restore_best_adapter)
