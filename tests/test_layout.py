"""docs/concepts.md's "Where things live" map matches the code: every module listed, every import allowed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_m2ist"
MAP = ROOT / "docs" / "concepts.md"


def _tables() -> tuple[dict[str, set[str]], dict[str, str]]:
    """(room -> rooms it may import, module or sub-package path -> room), read from the map."""
    text = MAP.read_text().split("## Where things live", 1)[1]
    rules, rooms = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("room", "---"):
            rules[cells[0]] = {r.strip() for r in re.sub(r"\(.*?\)", "", cells[1]).split(",")}
        elif len(cells) == 3 and cells[0].startswith("`"):
            rooms[cells[0].strip("`")] = cells[1]
    return rules, rooms


def _room_of(module: Path, rooms: dict[str, str]) -> str | None:
    relative = module.relative_to(PACKAGE).as_posix()
    top = relative.split("/")[0]
    return rooms.get(relative) or rooms.get(f"{top}/")


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Every `peft_m2ist` module `path` (or `source` as if it stood there) imports, anywhere in it, as a dotted
    name."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(ROOT).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import cache` imports a module
    return {name for name in found if name.split(".")[0] in ("peft_m2ist", "examples", "benchmarks")}


def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def test_every_module_is_in_the_map_and_every_row_names_a_module():
    _, rooms = _tables()
    for module in PACKAGE.rglob("*.py"):
        assert _room_of(module, rooms), f"{module.relative_to(ROOT)} is not in docs/concepts.md's map"
    for entry in rooms:
        assert (PACKAGE / entry).exists(), f"the map lists {entry}, which does not exist"


def _violations(module: Path, source: str | None = None) -> list[str]:
    """The imports of `module` that its room may not make."""
    rules, rooms = _tables()
    mine = _room_of(module, rooms)
    problems = []
    for name in sorted(_imports(module, source)):
        if name.split(".")[0] != "peft_m2ist":
            problems.append(f"{module.relative_to(ROOT)} imports {name} (examples/ and benchmarks/ are not library code)")
            continue
        target = _module_path(name)
        if target is None:
            continue  # `from .x import NAME` also yields `.x.NAME`: a name inside a module, not a module
        theirs = _room_of(target, rooms)
        if theirs not in rules[mine]:
            problems.append(f"{module.relative_to(ROOT)} ({mine}) imports {name} ({theirs})")
    return problems


def test_every_import_follows_the_maps_rules():
    problems = [p for module in sorted(PACKAGE.rglob("*.py")) for p in _violations(module)]
    assert not problems, "\n".join(problems)


def test_the_checker_reports_forbidden_imports():
    records = PACKAGE / "data" / "records.py"
    assert _violations(records, "from peft_m2ist.model import M2ISTModel\n") == [
        "peft_m2ist/data/records.py (data) imports peft_m2ist.model (tuner)"]
    assert _violations(records, "def f():\n    import peft_m2ist\n")  # the package imports the tuner
    assert _violations(PACKAGE / "head.py", "from .config import M2ISTConfig\n")  # plain -> tuner
    assert _violations(PACKAGE / "model.py", "from benchmarks import scales\n")
    assert not _violations(records, "from peft_m2ist.metrics.rec_accuracy.box_iou import box_iou\n")


def test_the_map_names_only_rooms_it_defines():
    rules, rooms = _tables()
    assert set(rooms.values()) <= set(rules)
    for allowed in rules.values():
        assert allowed <= set(rules), allowed
    assert re.search(r"tests/test_layout\.py", MAP.read_text())
