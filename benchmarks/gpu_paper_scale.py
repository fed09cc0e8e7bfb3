"""The paper-scale comparison on one GPU in one command, bounded in time.

DETR-R50 encoder + BERT-base (random weights), 640 px, 20 tokens, batch 64; full fine-tuning, LoRA, bottleneck
adapters, head-only and the four M2IST variants, all in one process:

1. the exact account (saved-tensor hooks, at the real batch: no extrapolation needed on a GPU);
2. `torch.cuda.max_memory_allocated` over one training step after a warm-up step (`reset_peak_memory_stats`), for
   M2IST also with its frozen towers in 4 micro-batches (`tower_micro_batch_size`); the peak of live tensors
   (`LiveTensorPeak`) is left to `memory_time.py` (its per-op bookkeeping would eat the time budget);
3. interleaved training-step times (`torch.cuda.synchronize` around each step), ratio to full fine-tuning;
4. inference latency of the M2IST models vs the towers alone.

    python benchmarks/gpu_paper_scale.py                 # on one H100: ends within ~5 minutes (--time-budget 240)
    python benchmarks/gpu_paper_scale.py --bf16          # the same under bf16 autocast
    python benchmarks/gpu_paper_scale.py --tf32          # float32 matmuls on TF32 tensor cores, like the convolutions
    python benchmarks/gpu_paper_scale.py --head-checkpointing   # every method's head recomputed in backward
    python benchmarks/gpu_paper_scale.py --store-head-feed-forward  # heads store their feed-forward hidden tensors
    python benchmarks/gpu_paper_scale.py --unfolded-batch-norm      # frozen batch norms fused, not folded into convs
    python benchmarks/gpu_paper_scale.py --channels-last            # every method's vision convolutions channels-last
    python benchmarks/gpu_paper_scale.py --batch-size 2 --steps 2   # CPU smoke test
    python benchmarks/gpu_paper_scale.py --scale default --batch-size 1 --steps 1  # the small pair (gpu_day.py --dry-run)

Timing rounds stop when the global `--time-budget` (seconds, counted from the start, model building included) is
spent: 65% of it for training steps, the rest for inference. The JSON (`benchmarks/results/gpu_paper_scale_<device>
[_bf16][_tf32][_headckpt][_storedffn].json`) is rewritten after every phase, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks` and the library

from benchmarks import baselines, environment, memory_time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("paper", "default", "tiny"), default="paper",
                   help="paper (default); default or tiny (benchmarks/scales.py) for CPU runs (tiny: gpu_day.py --dry-run)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 2 on CPU")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds (training and inference)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward")
    p.add_argument("--tf32", action="store_true", help="TF32 for float32 matmuls too, as for convolutions (CUDA only)")
    p.add_argument("--head-checkpointing", action="store_true",
                   help="gradient checkpointing in every method's grounding head")
    p.add_argument("--store-head-feed-forward", action="store_true",
                   help="every method's head stores its feed-forward hidden tensors instead of recomputing them")
    p.add_argument("--channels-last", action="store_true",
                   help="the vision tower's convolutions in channels-last memory format (every method alike)")
    p.add_argument("--unfolded-batch-norm", action="store_true",
                   help="the vision tower's frozen batch norms are fused (one op each) but not folded into the "
                        "convolutions before them (every method alike)")
    p.add_argument("--time-budget", type=float, default=240.0, help="global budget in seconds")
    p.add_argument("--methods", nargs="+", default=list(baselines.ALL_METHODS), choices=baselines.ALL_METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # steady kernels: the warm-up round must not re-tune them
    batch = a.batch_size or (64 if device.type == "cuda" else 2)
    suffix = ("_bf16" if a.bf16 else "") + ("_tf32" if a.tf32 else "") + ("_headckpt" if a.head_checkpointing else "")
    suffix += "_storedffn" if a.store_head_feed_forward else ""
    suffix += "_unfoldedbn" if a.unfolded_batch_norm else ""
    suffix += "_channelslast" if a.channels_last else ""
    args = argparse.Namespace(
        scale=a.scale, methods=a.methods, device=a.device, batch_size=batch, account_batches=[batch],
        extrapolate_to=64, repeats=a.steps, warmup=a.warmup, inference_repeats=a.steps, bottleneck=128,
        lora_rank=16, head_dropout=0.1, head_checkpointing=a.head_checkpointing, bf16=a.bf16, tf32=a.tf32,
        time_budget=a.time_budget, skip=["live_peak"], threads=None, seed=0, cached_features=True,
        stock_batch_norm=False, unfolded_batch_norm=a.unfolded_batch_norm,
        channels_last=a.channels_last, store_head_feed_forward=a.store_head_feed_forward,
        output=a.output or environment.RESULTS_DIR / f"gpu_paper_scale_{device.type}{suffix}.json",
    )
    result = memory_time.run(args)
    if device.type == "cuda":
        print(f"peak allocated over the run: {environment.mib(torch.cuda.max_memory_allocated())} MiB on "
              f"{torch.cuda.get_device_name(device)}")
    return result


if __name__ == "__main__":
    main()
