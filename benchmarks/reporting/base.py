"""What every part of the report shares: method labels, number formats, what a result file's settings say about how
it was run, and the templates that hold the report's prose (`benchmarks/templates/`)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from benchmarks.baselines import ALL_METHODS, BASELINES, M2IST_VARIANTS
from benchmarks.environment import RESULTS_DIR

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
TEMPLATES = HERE / "templates"
GOAL_METHOD = "m2ist_shared_sum"  # the paper's configuration
VARIANTS = list(M2IST_VARIANTS)  # the interaction x mixture variants the goals are checked for (not the preset)
PAPER_BATCH = 64  # the batch the paper's memory and time figures are given at
MICRO = "_tower_micro_batches"  # suffix of the peak measured with M2IST's frozen towers in micro-batches
NOT_JUDGED = "not judged"

LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA (towers' attention) + head",
    "adapter": "bottleneck adapters (in towers) + head",
    "head_only": "head only (frozen towers)",
    "m2ist_shared_sum": "M2IST shared / sum (paper)",
    "m2ist_shared_gated": "M2IST shared / gated",
    "m2ist_cross_attention_sum": "M2IST cross-attention / sum",
    "m2ist_cross_attention_gated": "M2IST cross-attention / gated",
    "m2ist_paper": "M2IST preset=\"paper\" (the authors' model)",
}

ENVIRONMENT = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                 trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
PROSE = ENVIRONMENT.get_template("prose.md.j2").module  # its macros: PROSE.account_caption(), ...


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def millions(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def machine_line(result: dict) -> str:
    from benchmarks.reporting.staleness import stale_note  # it reads HERE from this module

    m = result["machine"]
    where = f"GPU {m['gpu']}" if m.get("gpu") else f"CPU {m['cpu']}, {m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
    load = ""
    if "load_average_1min_at_start" in m:
        load = (f"; 1-min load average {m['load_average_1min_at_start']:.1f} at start"
                + (f", {m['load_average_1min_at_end']:.1f} at end" if "load_average_1min_at_end" in m else "")
                + f" on {m.get('cpu_count')} cores")
    return (f"{where}; torch {m['torch']}, transformers {m.get('transformers')}, peft {m.get('peft')}; "
            f"commit {m.get('git_commit')}"
            + (" + uncommitted changes" if m.get("git_worktree_clean") is False
               and "uncommitted" not in str(m.get("git_commit")) else "")
            + f"; {m['date']}{load}"
            + stale_note(result))


def load_results() -> list[dict]:
    out = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        data["_file"] = path.relative_to(HERE).as_posix()
        out.append(data)
    return out


def has_baseline(runs: list[dict]) -> bool:
    """Whether any of `runs` trained a baseline (the accuracy goals compare M2IST with them)."""
    return any(m in BASELINES for r in runs for m in r["methods"])


def ordered(methods: dict) -> list[str]:
    return [m for m in ALL_METHODS if m in methods]


# ---------------------------------------------------------------------------------------------- how a run was made
def frozen_batch_norm(r: dict) -> str:
    """"folded" (into the convolutions), "fused" (one op each) or "stock", from a run's settings (older files: stock)."""
    setting = str(r["settings"].get("frozen_batch_norm", "stock"))
    return next((kind for kind in ("folded", "fused") if setting.startswith(kind)), "stock")


def implementation_notes(r: dict) -> list[str]:
    """What differs from the current implementation in a run, as short labels: files written before the lean head
    feed-forward; the head's feed-forward hidden tensors stored (before they were recomputed, or
    `--store-head-feed-forward`); stock frozen batch norms (before they were fused, or `--stock-batch-norm`); fused
    ones not folded into the convolutions (before they were folded, or `--unfolded-batch-norm`). Under head
    checkpointing the feed-forward block is recomputed with the rest of the layer, so its own setting does not
    apply."""
    s = r["settings"]
    ffn = s.get("head_feed_forward")
    notes = ["stock head FFN"] * (ffn is None)
    if ffn is not None and not ffn.startswith("hidden recomputed") and not s.get("head_checkpointing"):
        notes.append("head FFN hidden stored")
    if r.get("scale", "paper") == "paper":
        notes += {"stock": ["stock frozen BN"], "fused": ["frozen BN not folded"], "folded": []}[frozen_batch_norm(r)]
    return notes


def where(r: dict) -> str:
    """The machine and the settings of a run in a few words, for the summary."""
    m, s = r["machine"], r["settings"]
    parts = [m["gpu"].removeprefix("NVIDIA ") if m.get("gpu") else f"CPU {m['torch_threads']} thread"
             + ("s" if m["torch_threads"] > 1 else "")]
    parts += ["bf16"] * bool(s.get("bf16")) + ["TF32 matmuls"] * bool(s.get("tf32"))
    parts += ["channels-last convs"] * bool(s.get("channels_last"))
    parts += ["head checkpointing"] * bool(s.get("head_checkpointing"))
    parts += implementation_notes(r)
    return ", ".join(parts)
