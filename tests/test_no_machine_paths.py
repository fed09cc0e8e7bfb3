"""No path of one particular machine in what the repository ships, and no `peft_m2ist/...` path in the docs that
does not exist.

A user has none of a development machine's folders, so a path to one in the docs, the examples, the benchmarks'
JSON or the library's messages is a dead reference (or leaks where a run happened). Sources are cited by what anyone
can reach: the paper (arXiv 2407.01131), a public repository, a file of this repository.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What ships: the README, the docs, the examples, the benchmarks (their JSON and Markdown included), the library and
# the scripts. tests/ is not scanned: tests legitimately build temporary folders.
SCANNED = ("README.md", "CHANGELOG.md", "setup.cfg", "pyproject.toml", "docs", "examples", "benchmarks", "peft_m2ist",
           "scripts")
TEXT_SUFFIXES = {".md", ".py", ".json", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".toml", ".j2", ".html", ".csv"}

# Each pattern with the reason it is a machine path. System paths every machine has (`/dev/null`,
# `/usr/bin/env`, `/proc/cpuinfo`) and home-relative ones (`~/.cache/...`) are fine, and so is a path inside a URL:
# the look-behind refuses a match right after a word character, a dot, a slash, `~` or `$`, so
# `https://github.com/home/x` or `~/tmp/` does not count.
MACHINE_PATHS: dict[str, str] = {
    r"(?<![\w.~$/-])/(?:work|tmp|root|home|scratch|mnt)/": "an absolute folder of one machine (workspace, temporary "
                                                             "folder, a user's home)",
    r"(?<![\w.~$/-])/Users/": "a macOS home folder",
    r"/(?:private/)?var/folders/": "a macOS temporary folder",
    r"\b[A-Za-z]:\\\\?Users\\": "a Windows home folder",
    r"\.\./shared\b": "the development notes next to the repository, which no user has",
    r"\bshared[/]design\b": "the development notes next to the repository, which no user has",
    r"\bpytest-of-": "a folder pytest made for one test session",
    r"\bmethod\.md\b": "a design note that is not in this repository: cite the paper (arXiv 2407.01131)",
}


def shipped_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*"))
                         if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts)
    return files


def machine_paths(text: str) -> list[tuple[int, str, str]]:
    """(line number, the match, why it is refused) for every machine path in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for pattern, why in MACHINE_PATHS.items():
            found.extend((number, m.group(0), why) for m in re.finditer(pattern, line))
    return found


def test_the_patterns_refuse_machine_paths_and_pass_ordinary_text():
    def path(*parts: str) -> str:  # joined here, so that this file itself names no machine's folder
        return "/".join(parts)

    refused = [f"see {path('', 'work', 'notes', 'anchors.md')}", f"output_dir: {path('', 'tmp', 'run')}",
               "C:\\Users\\me\\adapter", f"export CACHE={path('', 'home', 'me', 'cache')}",
               f"from {path('..', 'shared', 'notes')}", f"cited from {path('shared', 'design')}",
               path("", "private", "var", "folders", "xy", "T", "pytest-of-me", "0"), "as summarised in method.md"]
    for text in refused:
        assert machine_paths(text), text
    passed = ["https://github.com/xuyang-liu16/M2IST", "`~/.cache/peft_m2ist/benchmark`", "2>/dev/null",
              "#!/usr/bin/env bash", "open('/proc/cpuinfo')", "`outputs/m2ist-shapes/feature_cache`",
              "$TMPDIR/run", "arXiv 2407.01131", "the shared up-projection", "https://example.org/home/page"]
    for text in passed:
        assert not machine_paths(text), text


def test_there_are_files_to_scan():
    names = {p.relative_to(ROOT).as_posix() for p in shipped_files()}
    assert {"README.md", "docs/concepts.md", "benchmarks/reference_paper.json", "peft_m2ist/__init__.py"} <= names


def test_nothing_shipped_names_a_machine_path():
    problems = [f"{path.relative_to(ROOT)}:{number}: {match!r}: {why}"
                for path in shipped_files()
                for number, match, why in machine_paths(path.read_text(encoding="utf-8", errors="replace"))]
    assert not problems, "\n".join(problems)


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_package_path_named_in_the_docs_exists(doc):
    """`peft_m2ist/tuner/model.py` or `peft_m2ist/data/` in a page must be a file or folder of the package (a path
    after `~/.cache/` or `$PEFT_M2IST_CACHE/` is a cache folder, not the package)."""
    text = doc.read_text(encoding="utf-8")
    missing = [m.group(0) for m in re.finditer(r"(?<![\w.~/$-])peft_m2ist/[\w/.]*\w", text)
               if not (ROOT / m.group(0)).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {sorted(set(missing))}"


def _resolves(dotted: str) -> bool:
    """`peft_m2ist.tuner.budget.MAX_MODULE_PARAMETERS`: the longest prefix that is a module of the package, then one
    attribute of it (a class, a function, a constant, or a module that its `__init__` imports)."""
    parts = dotted.split(".")
    depth = 1
    while depth < len(parts):
        candidate = ROOT.joinpath(*parts[: depth + 1])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            depth += 1
        else:
            break
    if depth == len(parts):
        return True
    module = importlib.import_module(".".join(parts[:depth]))
    return hasattr(module, parts[depth])


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_package_name_in_the_docs_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    names = sorted({m.group(0) for m in re.finditer(r"\bpeft_m2ist(?:\.[A-Za-z_]\w*)+", text)})
    unknown = [name for name in names if not _resolves(name)]
    assert not unknown, f"{doc.relative_to(ROOT)} names what the package does not have: {unknown}"
