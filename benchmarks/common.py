"""Compatibility names for code written against the old `benchmarks/common.py`, which now lives in modules with one
job each; import from those instead:

- `benchmarks.scales`: the backbone pairs (`Scale`, `build_scale`) and the synthetic batches (`make_batch`);
- `benchmarks.baselines`: the tuning methods (`ALL_METHODS`, `build_method`, `BaselineREC`, `parameter_counts`);
- `benchmarks.measurement`: memory (`exact_account`, `SavedForBackward`, `LiveTensorPeak`, `live_peak`, `cuda_peak`);
- `benchmarks.timing`: interleaved timing (`interleaved_times`, `median`);
- `benchmarks.environment`: `RESULTS_DIR`, `machine_info`, `command_line`, `mib`.

Still imported by `tests/test_head.py`, `tests/test_feed_forward.py` and `tests/test_frozen_batch_norm.py`.
"""

from benchmarks.baselines import (  # noqa: F401
    ALL_METHODS,
    BASELINES,
    M2IST_VARIANTS,
    BaselineREC,
    BottleneckAdapter,
    add_bottleneck_adapters,
    build_method,
    count_vision_tokens,
    parameter_counts,
    vision_token_layout,
)
from benchmarks.environment import RESULTS_DIR, command_line, free, machine_info, mib  # noqa: F401
from benchmarks.measurement import (  # noqa: F401
    LiveTensorPeak,
    SavedForBackward,
    cuda_peak,
    exact_account,
    extrapolate,
    live_peak,
    make_optimizer,
    tower_micro_batches,
    train_step,
)
from benchmarks.scales import FROZEN_BATCH_NORMS, Scale, build_scale, default_scale, make_batch, paper_scale  # noqa: F401
from benchmarks.timing import interleaved_times, median  # noqa: F401
