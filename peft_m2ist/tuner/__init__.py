"""What peft needs and nothing else: `M2ISTConfig`, the tap layer, `M2ISTModel` (the `BaseTuner`), the REC
`PeftModel`, the adapter plan (taps and sizes probed on the meta device) and the registration with peft."""

from .config import M2ISTConfig
from .layer import M2ISTTapLayer
from .model import M2ISTModel
from .peft_model import PeftModelForReferringExpressionComprehension
from .registration import M2IST_PEFT_TYPE, REC_TASK_TYPE, register

__all__ = [
    "M2IST_PEFT_TYPE",
    "REC_TASK_TYPE",
    "M2ISTConfig",
    "M2ISTModel",
    "M2ISTTapLayer",
    "PeftModelForReferringExpressionComprehension",
    "register",
]
