"""Which piece of a model an ONNX export failed on: the tower, its module and the operation, for `OnnxExportError`.

Two stages can fail. `torch.export` (tracing) fails inside a module's forward (a Python branch on a tensor's value,
an unsupported construct): the innermost module on the failing call stack is the piece. The ONNX translation fails on
an operation of the traced graph that has no ONNX function: the graph node's recorded module stack gives the piece
and its target the operation.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

import torch
from torch import nn

_NODE = re.compile(r"translating node %(\w+)")
_TARGET = re.compile(r"OpOverload\(op='([\w.:]+)'|target=torch\.ops\.([\w.]+)")


@dataclass(frozen=True)
class Piece:
    """Where an export failed: `tower` (``"vision"``, ``"text"`` or ``None`` for the adapter's own modules), the
    tower's class, the failing module's name inside it (``""``: the tower itself) and class, the operation (for a
    translation failure) and the source line that raised (for a tracing failure)."""

    tower: str | None = None
    tower_class: str = ""
    module: str = ""
    module_class: str = ""
    op: str = ""
    line: str = ""


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX; `piece` says which tower, module and operation failed."""

    def __init__(self, message: str, piece: Piece) -> None:
        super().__init__(message)
        self.piece = piece

    @classmethod
    def from_failure(cls, stage: str, err: BaseException, piece: Piece) -> OnnxExportError:
        where = ""
        if piece.tower:
            where = f": the {piece.tower} tower {piece.tower_class} fails"
        elif piece.module_class:
            where = ": the adapter fails"
        if piece.module:
            where += f" in its module `{piece.module}` ({piece.module_class})"
        what = (f"{stage} has no function for the operation `{piece.op}`" if piece.op else f"{stage} failed")
        at = f" at {piece.line}" if piece.line else ""
        advice = (f"This {piece.tower_class} tower cannot be exported with torch {torch.__version__}; use a tower "
                  "of another family (docs/deploy.md lists the families tested)." if piece.tower else
                  "See docs/deploy.md.")
        return cls(f"cannot export the model to ONNX{where}: {what}{at} ({summary(err)}). {advice}", piece)


def summary(err: BaseException) -> str:
    """The innermost cause of `err` as `Type: first line`."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = next((line for line in lines if not line.startswith(("#", "-"))), "")
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def tower_names(root: nn.Module, encoder) -> dict[str, tuple[str, nn.Module]]:
    """``{"vision": (name, tower), "text": (name, tower)}``: each tower of `encoder` (a `TowerEncoder`) and its
    module name inside `root`."""
    names = {id(module): name for name, module in root.named_modules()}
    return {kind: (names.get(id(tower), ""), tower)
            for kind, tower in (("vision", encoder.vision_tower), ("text", encoder.text_tower))}


def _place(name: str, module_class: str, towers: dict[str, tuple[str, nn.Module]], **extra: str) -> Piece:
    """The `Piece` for the module called `name` in the exported root: which tower holds it, its name inside it."""
    name = name.removeprefix("L['self'].").removeprefix("self.").replace(".base_layer", "")  # taps wrap modules
    for kind, (tower_name, tower) in towers.items():
        if tower_name and (name == tower_name or name.startswith(tower_name + ".")):
            inner = name[len(tower_name):].lstrip(".")
            return Piece(kind, type(tower).__name__, inner, module_class if inner else type(tower).__name__, **extra)
    return Piece(None, "", name, module_class, **extra)


def unsupported_piece(err: BaseException, root: nn.Module, towers: dict[str, tuple[str, nn.Module]],
                      exported: torch.export.ExportedProgram | None = None) -> Piece:
    """Where the export of `root` failed with `err`: from the traced graph's node for a translation failure
    (`exported` given), else from the call stack of the tracing failure (see the module doc)."""
    if exported is not None:
        return _from_graph(err, exported, towers)
    return _from_stack(err, root, towers)


def _messages(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def _from_graph(err: BaseException, exported: torch.export.ExportedProgram,
                towers: dict[str, tuple[str, nn.Module]]) -> Piece:
    text = _messages(err)
    target = _TARGET.search(text)
    op = next((group for group in target.groups() if group), "") if target else ""
    op = op.removesuffix(".default")
    node_name = _NODE.search(text)
    node = next((n for n in exported.graph.nodes if node_name and n.name == node_name.group(1)), None)
    if node is None and op:
        node = next((n for n in exported.graph.nodes if str(n.target).removesuffix(".default") == op), None)
    stack = list((node.meta.get("nn_module_stack") or {}).values()) if node is not None else []
    if not stack:
        return Piece(op=op)
    name, module_type = stack[-1]
    module_class = getattr(module_type, "__name__", str(module_type).rsplit(".", 1)[-1].strip("'>"))
    return _place(name, module_class, towers, op=op)


def _from_stack(err: BaseException, root: nn.Module, towers: dict[str, tuple[str, nn.Module]]) -> Piece:
    names = {id(module): name for name, module in root.named_modules() if name}
    innermost, line = None, ""
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            innermost = owner
        if "/torch/" not in frame.f_code.co_filename.replace("\\", "/"):
            line = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{lineno} in {frame.f_code.co_name}"
    if innermost is None:
        return Piece(line=line)
    return _place(names[id(innermost)], type(innermost).__name__, towers, line=line)
