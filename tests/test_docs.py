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


def test_concepts_explains_in_at_most_250_lines():
    """An explainer to read in one sitting: measurements go to results.md and fidelity.md, history to CHANGELOG.md."""
    lines = (DOCS / "concepts.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"docs/concepts.md has {len(lines)} lines"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchor_rule_matches_githubs():
    assert _anchor("The grounding head (`head.py`)") == "the-grounding-head-headpy"
    assert _anchor("Known gap: `import peft_m2ist` must come first") == "known-gap-import-peft_m2ist-must-come-first"


def test_every_link_between_pages_reaches_a_page_and_heading():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", page.read_text(encoding="utf-8")):
            if not target and not anchor:
                continue
            linked = (page.parent / target).resolve() if target else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
                continue
            headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.MULTILINE)}
            if anchor and anchor not in headings:
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, broken


def test_readme_and_setup_cfg_name_the_same_python():
    readme = re.search(r"Python (3\.\d+) or newer", (ROOT / "README.md").read_text(encoding="utf-8"))
    required = re.search(r"python_requires = >=(3\.\d+)", (ROOT / "setup.cfg").read_text(encoding="utf-8"))
    assert readme and required, "README.md says 'Python 3.X or newer' and setup.cfg has python_requires = >=3.X"
    assert readme.group(1) == required.group(1)
