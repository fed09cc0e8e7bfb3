"""peft_m2ist.training.evaluation: two data-parallel CPU processes report each phrase type's own accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TWO_CPU_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CPU = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow


EVALUATE_DRIVER = """
import json, sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from peft_m2ist.training.evaluation import evaluate


class Echo(torch.nn.Module):
    def forward(self, pred):
        return SimpleNamespace(pred_boxes=pred)


def collate(rows):
    labels = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * len(rows))
    miss = torch.tensor([0.1, 0.1, 0.05, 0.05])
    pred = torch.stack([label if row["hit"] else miss for row, label in zip(rows, labels)])
    return {"pred": pred, "labels": labels, "phrase_type": [row["type"] for row in rows]}


accelerator = Accelerator(cpu=True)
loader = accelerator.prepare(DataLoader(json.loads(sys.argv[1]), batch_size=2, collate_fn=collate))
scores = evaluate(Echo(), loader, accelerator)
if accelerator.is_main_process:
    print(json.dumps({"processes": accelerator.num_processes, "scores": scores}))
accelerator.end_training()  # destroys the process group: exiting with it alive can abort in gloo's threads
"""


def test_two_processes_keep_each_phrase_type_with_its_own_samples(tmp_path):
    """The processes meet the phrase types in different orders (process 0's batches start with 'attribute', process
    1's with 'relation'); each type's accuracy is still its own. Types outside the benchmark's are kept, the padding
    of the uneven last batch is dropped, and no metric cache file is left behind."""
    hits = {"attribute": True, "relation": False, "position": True, "ordinal": False, "custom": True}
    order = ["attribute", "relation", "relation", "attribute", "position", "custom", "ordinal", "position", "relation"]
    rows = [{"type": t, "hit": hits[t]} for t in order]  # 9 rows, batches of 2: process 0 gets batches 0, 2, 4
    driver = tmp_path / "evaluate_driver.py"
    driver.write_text(EVALUATE_DRIVER)
    cache = tmp_path / "metrics_cache"
    env = {**os.environ, **CPU, "HF_METRICS_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*TWO_CPU_PROCESSES, str(driver), json.dumps(rows)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["processes"] == 2
    assert out["scores"] == {"accuracy": pytest.approx(5 / 9), "mean_iou": pytest.approx(5 / 9), "accuracy_attribute": 1.0,
                      "accuracy_relation": 0.0, "accuracy_position": 1.0, "accuracy_ordinal": 0.0,
                      "accuracy_custom": 1.0, "num_samples": 9, "non_finite": 0.0, "degenerate": 0.0}  # the padding of the last batch is not counted
    assert not list(cache.rglob("*.arrow"))  # the metric is only fed and computed on the main process, in memory
