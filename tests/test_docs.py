"""The docs must not drift from the code: config fields and defaults, and the paper-scale parameter count."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from peft import PeftConfig

from peft_m2ist import M2ISTConfig
from peft_m2ist.modeling.experts import M3ISA

DOCS = Path(__file__).resolve().parent.parent / "docs"

# the paper's setting (tests/test_paper_scale.py): DETR-R50 encoder d=256 + BERT-base d=768, taps on layers 0-5
PAPER_BLOCKS = 6
DETR_DIM, BERT_DIM = 256, 768


def _own_fields() -> list[dataclasses.Field]:
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f for f in dataclasses.fields(M2ISTConfig) if f.name not in inherited]


def _rendered_default(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _table_row(text: str, name: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(f"| `{name}` |"):
            return line
    return None


def test_there_are_own_fields_to_check():
    names = {f.name for f in _own_fields()}
    assert {"vision_tower", "bottleneck_dim", "interaction", "tower_shapes"} <= names
    assert "task_type" not in names and "peft_type" not in names


@pytest.mark.parametrize("field", _own_fields(), ids=lambda f: f.name)
def test_every_config_field_is_documented_with_its_default(field):
    assert field.default is not dataclasses.MISSING, f"{field.name} has no plain default; extend this test"
    row = _table_row((DOCS / "config.md").read_text(encoding="utf-8"), field.name)
    assert row is not None, f"docs/config.md has no table row for `{field.name}`"
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    # type cell may contain escaped pipes (`list[str] \| None`), so the default is looked for in the row
    assert f"`{_rendered_default(field.default)}`" in row, (
        f"docs/config.md: the row of `{field.name}` does not show its default `{_rendered_default(field.default)}`: "
        f"{cells}"
    )


def _paper_scale_adapter_only() -> int:
    """Parameters of the 6 M3ISA blocks at paper sizes: the adapter-only count, without building the towers."""
    defaults = M2ISTConfig()  # the paper's sizes: bottleneck 128, interaction width = head width 256
    blocks = [M3ISA(defaults, DETR_DIM, DETR_DIM, DETR_DIM, BERT_DIM, BERT_DIM, BERT_DIM) for _ in range(PAPER_BLOCKS)]
    return sum(p.numel() for block in blocks for p in block.parameters())


def test_concepts_quotes_the_paper_scale_adapter_only_count():
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    match = re.search(r"Paper-scale adapter-only count: \*\*([\d,]+)\*\*", text)
    assert match, "docs/concepts.md must state 'Paper-scale adapter-only count: **N**'"
    quoted = int(match.group(1).replace(",", ""))
    expected = _paper_scale_adapter_only()
    assert quoted == expected, f"docs/concepts.md quotes {quoted:,}, the code gives {expected:,}"
    # the printed test output and the arithmetic in the doc use the same number
    assert f"adapter-only: {expected:,}" in text
    assert f"6 blocks \N{MULTIPLICATION SIGN} {expected // PAPER_BLOCKS:,} = **{expected:,}**" in text
