"""The docs must not drift from the code: docs/config.md is what scripts/config_reference.py writes from the config
dataclass, and concepts.md quotes the paper-scale parameter count the code gives."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

PAPER_BLOCKS = 6  # the paper's setting (tests/test_paper_scale.py): taps on layers 0-5 of both towers


def _config_reference():
    """scripts/config_reference.py, imported from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_own_fields_to_check():
    names = {f.name for f in _config_reference().own_fields()}
    assert {"vision_tower", "bottleneck_dim", "interaction", "tower_shapes"} <= names
    assert "task_type" not in names and "peft_type" not in names


def test_config_reference_is_current():
    written = (DOCS / "config.md").read_text(encoding="utf-8")
    assert written == _config_reference().render(), (
        "docs/config.md differs from the M2ISTConfig dataclass: run python scripts/config_reference.py")


def test_config_reference_has_one_row_per_field_with_its_default():
    reference = _config_reference()
    text = reference.render()
    for field in reference.own_fields():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{field.name}` |")]
        assert len(rows) == 1, (field.name, rows)
        shown = reference.render_default(reference.default_of(field)).replace("|", "\\|")
        assert f"| `{shown}` |" in rows[0], (field.name, rows[0])


def test_concepts_quotes_the_paper_scale_adapter_only_count_consistently():
    """concepts.md quotes tests/test_paper_scale.py's printout (that test checks the printout against the model it
    builds); the bold count and the per-block arithmetic must be the printout's number."""
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    match = re.search(r"Paper-scale adapter-only count: \*\*([\d,]+)\*\*", text)
    assert match, "docs/concepts.md must state 'Paper-scale adapter-only count: **N**'"
    quoted = int(match.group(1).replace(",", ""))
    printed = re.search(r"^adapter-only: ([\d,]+)  projections \+ head", text, flags=re.MULTILINE)
    assert printed, "docs/concepts.md must quote tests/test_paper_scale.py's printout"
    assert quoted == int(printed.group(1).replace(",", "")), "the bold count is not the printed one"
    assert quoted % PAPER_BLOCKS == 0
    assert f"{PAPER_BLOCKS} blocks \N{MULTIPLICATION SIGN} {quoted // PAPER_BLOCKS:,} = **{quoted:,}**" in text
