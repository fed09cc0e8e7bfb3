"""The rooms of `peft_m2ist/` and the imports between them: a room is a top-level folder or module of the package,
and it may import only the rooms `RULES` names (imports inside functions included).

The rule in one line: the towers know nothing of adapters, the modeling nothing of peft, the data nothing of the
model, and the library nothing of `examples/` or `benchmarks/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_m2ist"

# room -> the rooms it may import (its own always included)
RULES: dict[str, set[str]] = {
    "towers": set(),
    "pretrained": set(),
    "metrics": set(),
    "modeling": {"towers"},
    "data": {"metrics"},
    "model_card": {"pretrained", "__init__"},  # `__version__`, read inside a function
    "tuner": {"modeling", "towers", "model_card"},
    "training": {"tuner", "modeling", "towers", "pretrained", "data", "metrics", "model_card", "__init__"},
    "loading": {"tuner", "towers", "pretrained"},
    "inference": {"tuner", "modeling", "towers", "pretrained", "data", "loading", "__init__"},
    "export": {"modeling", "towers", "loading"},  # the ONNX export: the tuner is reached through the model
    "__init__": {"tuner", "modeling", "towers"},
}


def room_of(module: Path) -> str:
    """`peft_m2ist/<room>/...` or `peft_m2ist/<room>.py`."""
    first = module.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Every `peft_m2ist`, `examples` or `benchmarks` module `path` (or `source` as if it stood there) imports,
    anywhere in it, as a dotted name."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = ".".join(parts if path.name == "__init__.py" else parts[:-1]).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base]) if base else ".".join(pkg)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import cache` imports a module
    return {name for name in found if name.split(".")[0] in ("peft_m2ist", "examples", "benchmarks")}


def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def violations(module: Path, source: str | None = None) -> list[str]:
    """The imports of `module` that its room may not make."""
    mine = room_of(module)
    problems = []
    for name in sorted(_imports(module, source)):
        if name.split(".")[0] != "peft_m2ist":
            problems.append(f"{module.relative_to(ROOT)} imports {name} (examples/ and benchmarks/ are not library code)")
            continue
        target = _module_path(name)
        if target is None:
            continue  # `from .x import NAME` also yields `.x.NAME`: a name inside a module, not a module
        theirs = room_of(target)
        if theirs != mine and theirs not in RULES[mine]:
            problems.append(f"{module.relative_to(ROOT)} ({mine}) imports {name} ({theirs})")
    return problems


def test_every_module_is_in_a_known_room():
    unknown = sorted({room_of(m) for m in PACKAGE.rglob("*.py")} - set(RULES))
    assert not unknown, f"rooms with no rule in tests/test_layout.py: {unknown}"
    for room, allowed in RULES.items():
        assert allowed <= set(RULES), (room, allowed - set(RULES))


def test_every_import_follows_the_rules():
    problems = [p for module in sorted(PACKAGE.rglob("*.py")) for p in violations(module)]
    assert not problems, "\n".join(problems)


def test_the_checker_reports_forbidden_imports():
    records = PACKAGE / "data" / "records.py"
    assert violations(records, "from peft_m2ist.tuner.model import M2ISTModel\n") == [
        "peft_m2ist/data/records.py (data) imports peft_m2ist.tuner.model (tuner)"]
    assert violations(records, "def f():\n    import peft_m2ist\n")  # the package imports the tuner
    head = PACKAGE / "modeling" / "head.py"
    assert violations(head, "from ..tuner.config import M2ISTConfig\n") == [
        "peft_m2ist/modeling/head.py (modeling) imports peft_m2ist.tuner.config (tuner)"]
    layouts = PACKAGE / "towers" / "layouts.py"
    assert violations(layouts, "from ..modeling.head import GroundingHead\n")  # towers know nothing of adapters
    assert violations(PACKAGE / "tuner" / "model.py", "from benchmarks import scales\n")
    assert not violations(records, "from peft_m2ist.metrics.rec_accuracy.box_iou import box_iou\n")
    assert not violations(head, "from .feed_forward import LeanFeedForwardEncoderLayer\n")


def test_no_module_is_over_400_lines_but_the_config():
    long = {m.relative_to(ROOT).as_posix(): n for m in PACKAGE.rglob("*.py")
            if (n := len(m.read_text().splitlines())) > 400}
    long.pop("peft_m2ist/tuner/config.py", None)
    assert not long, long
    assert len((PACKAGE / "tuner" / "model.py").read_text().splitlines()) <= 350
