"""peft-m2ist: M2IST (Multi-Modal Interactive Side-Tuning) for referring expression comprehension, as a PEFT plugin.

Importing this package registers the `M2IST` peft type and the `REFERRING_EXPRESSION_COMPREHENSION` task type, so
`peft.get_peft_model(pair, M2ISTConfig(...))` and `PeftModel.from_pretrained(pair, path)` work.
"""

from .config import M2ISTConfig
from .frozen_batch_norm import (
    FoldedFrozenBatchNorm2d,
    FrozenBatchNormFoldedConv2d,
    FusedFrozenBatchNorm2d,
    fold_frozen_batch_norms,
    fuse_frozen_batch_norms,
)
from .layer import M2ISTTapLayer
from .model import M2ISTModel
from .outputs import ReferringExpressionOutput
from .pair import VisionTextPair
from .peft_model import PeftModelForReferringExpressionComprehension
from .registration import M2IST_PEFT_TYPE, REC_TASK_TYPE, register
from .tower_features import TowerFeatures

register()

__version__ = "0.1.0"

__all__ = [
    "M2IST_PEFT_TYPE",
    "REC_TASK_TYPE",
    "FoldedFrozenBatchNorm2d",
    "FrozenBatchNormFoldedConv2d",
    "FusedFrozenBatchNorm2d",
    "M2ISTConfig",
    "M2ISTModel",
    "M2ISTTapLayer",
    "PeftModelForReferringExpressionComprehension",
    "ReferringExpressionOutput",
    "TowerFeatures",
    "VisionTextPair",
    "fold_frozen_batch_norms",
    "fuse_frozen_batch_norms",
]
