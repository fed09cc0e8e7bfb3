"""peft-m2ist: M2IST (Multi-Modal Interactive Side-Tuning) for referring expression comprehension, as a PEFT plugin.

Importing this package registers the `M2IST` peft type and the `REFERRING_EXPRESSION_COMPREHENSION` task type, so
`peft.get_peft_model(pair, M2ISTConfig(...))` and `PeftModel.from_pretrained(pair, path)` work.
"""

from .modeling.outputs import ReferringExpressionOutput
from .towers.features import TowerFeatures
from .towers.frozen_batch_norm import (
    FoldedFrozenBatchNorm2d,
    FrozenBatchNormFoldedConv2d,
    FusedFrozenBatchNorm2d,
    fold_frozen_batch_norms,
    fuse_frozen_batch_norms,
)
from .towers.pair import VisionTextPair
from .tuner.config import M2ISTConfig
from .tuner.layer import M2ISTTapLayer
from .tuner.model import M2ISTModel
from .tuner.peft_model import PeftModelForReferringExpressionComprehension
from .tuner.registration import M2IST_PEFT_TYPE, REC_TASK_TYPE, register

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
