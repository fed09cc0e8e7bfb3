"""What an earlier training run leaves in its output folder, for the tests of the used-folder refusal."""

from __future__ import annotations

import json
from pathlib import Path


def write_earlier_run(out: Path) -> None:
    """What an earlier run left in `out`: two complete checkpoints of a long run, its best.json and results.json."""
    for step in (1400, 1500):
        folder = out / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "run_state.json").write_text(json.dumps({"step": step}))
    (out / "best.json").write_text(json.dumps({"accuracy": 0.99, "epoch": 7, "step": 1400}))
    (out / "results.json").write_text("{}")
