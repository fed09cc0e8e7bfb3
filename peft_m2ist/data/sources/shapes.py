"""``--dataset shapes``: the built-in shapes benchmark (``peft_m2ist.data.benchmark``), built from ``--data_seed``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peft_m2ist.data.records import LoadReport, LoadResult
from peft_m2ist.data.sources.base import DataSource, register

SHAPES_SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout")


@register
@dataclass
class ShapesSource(DataSource):
    """The shapes benchmark: no source flag; its splits are ``SHAPES_SPLITS``, cached in ``cache_dir``."""

    kind = "shapes"
    standard_eval_splits = {(None, None): ("val",)}

    data_seed: int = 0
    cache_dir: str | None = None
    _shapes: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_kind_flags(cls, flags: Mapping[str, Any]) -> ShapesSource:
        return cls(on_bad_record=flags.get("on_bad_record") or "raise", data_seed=flags.get("data_seed") or 0,
                   cache_dir=flags.get("cache_dir"))

    def describe(self) -> str:
        return f"shapes benchmark (seed {self.data_seed})"

    def held_splits(self) -> dict[str, int | None]:
        return dict.fromkeys(SHAPES_SPLITS)

    def missing_split(self, flag: str, name: str, held: Mapping[str, int | None]) -> str:
        return f"{flag} {name}: the shapes benchmark has the splits {', '.join(SHAPES_SPLITS)}"

    def load(self, split: str) -> LoadResult:
        from peft_m2ist.data.benchmark import load_shapes_benchmark

        if self._shapes is None:
            self._shapes = load_shapes_benchmark(seed=self.data_seed, cache_dir=self.cache_dir)
        data = self._shapes[split]
        return LoadResult(data, LoadReport(source=f"shapes benchmark [{split}]", kept=len(data)))
