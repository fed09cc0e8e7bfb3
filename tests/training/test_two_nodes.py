"""Past one machine: two "nodes" on this machine, each with its own feature-cache folder (`--feature_cache_scope
node`), train as one process does.

Each node is a `torchrun --nnodes 2 --node_rank R` on localhost with one CPU process; the nodes share the output
folder (as a cluster's shared file system) but not their cache folders (node-local scratch disks).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import test_train_script
import torch
from safetensors.torch import load_file

from peft_m2ist.training.feature_cache import CACHE_SCOPES, is_cache_builder

towers = test_train_script.towers  # the fixture: a tiny MobileNetV2 and a tiny BERT saved as HF folders
CPU = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("main", "local_main", "scope", "builds"), [
    (True, True, "global", True), (False, True, "global", False), (False, True, "node", True),
    (False, False, "node", False), (True, True, "node", True)])
def test_who_builds_the_cache(main, local_main, scope, builds):
    accelerator = SimpleNamespace(is_main_process=main, is_local_main_process=local_main)
    assert is_cache_builder(accelerator, scope) is builds
    assert scope in CACHE_SCOPES


def test_an_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="scope"):
        is_cache_builder(SimpleNamespace(is_main_process=True, is_local_main_process=True), "cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(procs: tuple[subprocess.Popen, ...], timeout: float) -> list[str]:
    """Each process's output; on a hang, every process is killed and the test fails with all their outputs (a
    bare `TimeoutExpired` names the command only, and a node left waiting would outlive the test)."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:  # each run leads its own process group: torchrun's workers go with their agent
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        tails = [f"--- process {i} (exit {proc.wait()}):\n{proc.communicate()[0][-3000:]}" for i, proc in enumerate(procs)]
        pytest.fail(f"a run did not finish within {timeout:.0f} s:\n" + "\n".join(tails))


def _run_args(towers, out, cache, batch_size: int) -> list[str]:
    return [str(test_train_script.SCRIPT), *test_train_script._args(towers, out),
            "--train_samples", "16", "--eval_samples", "8", "--batch_size", str(batch_size), "--num_epochs", "1",
            "--max_train_steps", "2", "--checkpointing_steps", "0", "--feature_cache_dir", str(cache),
            "--head_dropout", "0", "--head_attention_dropout", "0",  # no per-process random numbers
            # a constant learning rate: accelerate steps a scheduler once per process at each optimiser step
            "--lr_scheduler", "constant", "--warmup_ratio", "0"]


@pytest.mark.slow
def test_two_nodes_with_node_local_caches_train_as_one_process(towers, tmp_path):
    one = subprocess.Popen([sys.executable, *_run_args(towers, tmp_path / "one", tmp_path / "cache_one", 8)],
                           cwd=test_train_script.ROOT, env={**os.environ, **CPU}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1",
             *_run_args(towers, tmp_path / "two", tmp_path / f"cache_node{rank}", 4),
             "--feature_cache_scope", "node"],
            cwd=test_train_script.ROOT, env={**os.environ, **CPU}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        for rank in (0, 1)]
    logs = _outputs((one, *nodes), timeout=300)
    for proc, log in zip((one, *nodes), logs):
        assert proc.returncode == 0, log[-3000:]

    # each node built its own cache, the same as the one process's
    for node in (0, 1):
        for split in ("train", "eval-val"):
            reference = tmp_path / "cache_one" / split
            for array in sorted(reference.glob("*.npy")):
                assert np.array_equal(np.load(array), np.load(tmp_path / f"cache_node{node}" / split / array.name))
    # the same numbers: two processes of 4 samples each make the one process's batch of 8
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")]
    assert results[1]["steps"] == results[0]["steps"] == 2
    assert results[1]["mean_box_baseline"] == results[0]["mean_box_baseline"]
    assert results[1]["splits"]["val"]["num_samples"] == results[0]["splits"]["val"]["num_samples"] == 8
    assert results[1]["splits"]["val"]["mean_iou"] == pytest.approx(results[0]["splits"]["val"]["mean_iou"], abs=1e-5)
    weights = [load_file(tmp_path / run / "final_adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=1e-5, rtol=1e-4, msg=name)
