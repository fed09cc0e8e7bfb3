"""Prediction latency on the CPU: the ONNX export in onnxruntime against the same model in torch, same inputs.

    python benchmarks/onnx_latency.py                      # writes benchmarks/results/onnx_latency.json
    python benchmarks/onnx_latency.py --adapter outputs/m2ist-shapes/best_adapter --batch-sizes 1 16

The model is the README main job's: examples/configs/default.yaml's adapter on the offline towers (MobileNetV2 cut
at stride 16 + MiniLM-L6, 128 px, 20 tokens), built by examples/train_rec.py (untrained: latency does not depend on
the weights), or a trained adapter folder (`--adapter`, loaded on the towers it records, float32). It is exported
with `peft_m2ist.export.export_onnx` into a temporary folder; then, per batch size, torch (`model(**inputs)` under
`no_grad`, the input checks included) and onnxruntime (`session.run` on the same inputs as numpy arrays) run in
interleaved rounds (`benchmarks.timing.interleaved_times`), both on `--threads` threads. Reported: median
milliseconds per batch, the ratio onnxruntime / torch (below 1: onnxruntime is faster) and the largest absolute
difference between their boxes. Prints a table and writes JSON (`--output`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the library

import torch

from benchmarks.environment import RESULTS_DIR, command_line, machine_info
from benchmarks.timing import interleaved_times, median

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=None, help="a trained adapter folder (default: the main job's model, untrained)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "onnx_latency.json")
    return p.parse_args(argv)


def main_job_model():
    """examples/configs/default.yaml's model, built by examples/train_rec.py (its towers and adapter settings)."""
    from accelerate import PartialState

    spec = importlib.util.spec_from_file_location("train_rec_latency", ROOT / "examples" / "train_rec.py")
    train_rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_rec)
    PartialState(cpu=True)
    model, _, tokenizer = train_rec.build_model(train_rec.parse_args(["--config", str(ROOT / "examples" / "configs" /
                                                                                       "default.yaml")]))
    return model, tokenizer


def inputs_for(config, vocab_size: int, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic batch of the graph's inputs: random pixels with the lower quarter of odd samples padded, 12 real
    tokens (ids 1000..) of `max_text_tokens`."""
    g = torch.Generator().manual_seed(seed)
    s, n = int(config.image_size), int(config.max_text_tokens)
    pixel_mask = torch.ones(batch, s, s, dtype=torch.long)
    pixel_mask[1::2, 3 * s // 4 :, :] = 0
    attention_mask = torch.zeros(batch, n, dtype=torch.long)
    attention_mask[:, : min(12, n)] = 1
    input_ids = torch.randint(1000, min(vocab_size, 20000), (batch, n), generator=g) * attention_mask
    return {"pixel_values": torch.randn(batch, 3, s, s, generator=g) * pixel_mask[:, None],
            "pixel_mask": pixel_mask, "input_ids": input_ids, "attention_mask": attention_mask}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    from peft_m2ist.export import INPUT_NAMES, export_onnx

    if args.adapter:
        from peft_m2ist.loading import load_adapter_with_towers

        loaded = load_adapter_with_towers(args.adapter, dtype="float32")
        model, tokenizer, source = loaded.model, loaded.tokenizer, args.adapter
    else:
        model, tokenizer = main_job_model()
        source = "examples/configs/default.yaml (untrained)"
    model.eval()
    config = model.peft_config[model.active_adapter]
    machine = machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export = export_onnx(model, Path(tmp) / "m2ist.onnx")
        export_seconds = time.perf_counter() - start
        onnx_mib = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = onnxruntime.InferenceSession(str(export.path), options, providers=["CPUExecutionProvider"])
        rows = []
        for batch in args.batch_sizes:
            inputs = inputs_for(config, tokenizer.vocab_size, batch)
            feed = {name: inputs[name].numpy() for name in INPUT_NAMES}

            def run_torch(inputs=inputs):
                with torch.no_grad():
                    return model(**inputs).pred_boxes

            def run_onnxruntime(feed=feed):
                return session.run(["pred_boxes"], feed)[0]

            difference = float((torch.from_numpy(run_onnxruntime()) - run_torch()).abs().max())
            print(f"batch {batch}:")
            times = interleaved_times({"torch": run_torch, "onnxruntime": run_onnxruntime}, args.repeats,
                                      args.warmup, torch.device("cpu"))
            torch_s, ort_s = median(times["torch"]), median(times["onnxruntime"])
            rows.append({"batch_size": batch, "torch_ms": 1e3 * torch_s, "onnxruntime_ms": 1e3 * ort_s,
                         "ratio_onnxruntime_over_torch": ort_s / torch_s, "max_abs_box_difference": difference,
                         "rounds": len(times["torch"])})
    machine["load_average_1min_at_end"] = os.getloadavg()[0]
    result = {
        "kind": "onnx_latency",
        "command": command_line(),
        "machine": machine,
        "packages": {"onnxruntime": onnxruntime.__version__, **_versions("onnx", "onnxscript")},
        "model": source,
        "towers": {key: config.base_towers.get(key) for key in ("vision", "text")} if config.base_towers else None,
        "image_size": export.image_size,
        "text_tokens": export.text_tokens,
        "settings": {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup},
        "export_seconds": export_seconds,
        "onnx_mib": onnx_mib,
        "rows": rows,
    }
    print(f"\n{'batch':>5} | {'torch ms':>9} | {'onnxruntime ms':>14} | {'ort / torch':>11} | {'max |diff|':>10}")
    for row in rows:
        print(f"{row['batch_size']:>5} | {row['torch_ms']:>9.2f} | {row['onnxruntime_ms']:>14.2f} | "
              f"{row['ratio_onnxruntime_over_torch']:>11.3f} | {row['max_abs_box_difference']:>10.1e}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


def _versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        module = importlib.import_module(name)
        found[name] = module.__version__
    return found


if __name__ == "__main__":
    main()
