"""Where a training run's records come from: the ``--dataset`` kinds of ``examples/train_rec.py``, one class each.

``DataSource.from_flags`` builds the registered class of ``--dataset`` (``base.SOURCES``): ``ShapesSource``,
``ReferSource``, ``TransVGSource``, ``HFSource``. Each knows its standard splits (``standard_splits``; all of them:
``STANDARD_EVAL_SPLITS``, stated once here and in docs/real-data.md), checks the flags against the files before
anything is loaded (``check``: a wrong name, a missing file, a split the files do not hold, a Hub column that is
missing or of the wrong type, boxes that do not fit the declared format), and loads one split (``load``) through the
readers (``load_shapes_benchmark``, ``load_refer``, ``load_transvg``, ``load_hf_rec``). A fifth kind is one more
module with a ``@register``-ed ``DataSource`` subclass, imported here.

Every problem ``check`` finds raises ``SourceError``, a ``ValueError`` whose message starts with the flag to fix
and names the file (and, for boxes, the record).
"""

from peft_m2ist.data.sources.base import (
    SOURCES,
    DataSource,
    FileSource,
    SourceError,
    load_report,
    parse_mapping,
    parse_split_list,
    register,
    source_flags,
)

# the kinds register as they are imported: this order is --dataset's
# isort: off
from peft_m2ist.data.sources.shapes import SHAPES_SPLITS, ShapesSource
from peft_m2ist.data.sources.refer import REFER_SPLIT_BY, ReferSource
from peft_m2ist.data.sources.transvg import TRANSVG_NAMES, TransVGSource
from peft_m2ist.data.sources.hf import BOX_CHECK_ROWS, HF_COLUMN_ALIASES, HF_COLUMN_KEYS, HFSource, parse_hf_columns
# isort: on

DATASETS: tuple[str, ...] = tuple(SOURCES)
"""The ``--dataset`` kinds."""
MODE_FLAGS: dict[str, tuple[str, ...]] = {kind: source_class.flags for kind, source_class in SOURCES.items()}
"""The source flags each ``--dataset`` kind reads; giving another kind's flag is an error."""
SOURCE_FLAGS: tuple[str, ...] = source_flags()
STANDARD_EVAL_SPLITS: dict[tuple[str, str | None, str | None], tuple[str, ...]] = {
    (kind, *key): splits for kind, source_class in SOURCES.items()
    for key, splits in source_class.standard_eval_splits.items()}
"""Default ``--eval_splits`` of each dataset (the splits papers report); the training split is always ``train``.
The first is the one the best adapter is chosen on."""

__all__ = [
    "BOX_CHECK_ROWS",
    "DATASETS",
    "HF_COLUMN_ALIASES",
    "HF_COLUMN_KEYS",
    "MODE_FLAGS",
    "REFER_SPLIT_BY",
    "SHAPES_SPLITS",
    "SOURCES",
    "SOURCE_FLAGS",
    "STANDARD_EVAL_SPLITS",
    "TRANSVG_NAMES",
    "DataSource",
    "FileSource",
    "HFSource",
    "ReferSource",
    "ShapesSource",
    "SourceError",
    "TransVGSource",
    "load_report",
    "parse_hf_columns",
    "parse_mapping",
    "parse_split_list",
    "register",
    "source_flags",
]
