"""Can the data side keep up at RefCOCO's scale on one machine? Index build time, peak memory and loader throughput.

    python benchmarks/data_scale.py                       # RefCOCO's counts, writes benchmarks/results/data_scale.json
    python benchmarks/data_scale.py --images 200 --refs 500 --sentences 1400 --throughput-batches 2   # a smoke run

1. Writes a synthetic dataset in the refer API layout (`load_refer`) with RefCOCO's counts (19,994 images, 50,000
   refs, 142,210 expressions, its split sizes), each image a tiny JPEG of its own file.
2. Builds the index of every split with `load_refer` in a fresh process, which reports its wall time and peak RSS.
   Every image file is decoded once there (docs/data.md), so the tiny JPEGs keep decoding cheap: the index time
   is the readers' own cost plus decoding tiny files; real 640 x 480 COCO photos add their decode time.
3. Measures the training loader (`RECCollator(train=True)`: TransVG augmentation onto a 640 px canvas, tokenizer,
   normalisation) in records/s with 1, 2 and 8 DataLoader workers, on real-size photos (scikit-image's samples
   resized to 640 x 480, JPEG), batch 64, and compares it with what a GPU training step at batch 64 consumes (the
   M2IST step time of `benchmarks/results/gpu_paper_scale_cuda.json`).
   With `--compare-reference` the loader before the tensor rendering (`benchmarks/loader_reference.py`: PIL
   augmentation, per-record numpy normalisation, `torch.stack`) is measured in the same run, interleaved with the
   current one for each worker count (reference, current, current, reference, ... `--rounds` times), and the JSON
   gets its records/s and the ratio per worker count, with the 1-minute load average before and after each timing
   (the cores may be shared with other processes: the ratio of interleaved timings is the portable number).

    python benchmarks/data_scale.py --workers 1 2 --compare-reference    # before and after, 1 and 2 workers

Prints a table and writes JSON (`--output`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the library

RESULTS = Path(__file__).resolve().parent / "results"
# RefCOCO (UNC splits): expressions and refs per split
REFCOCO_SPLITS = {"train": (120624, 42404), "val": (10834, 3811), "testA": (5657, 1975), "testB": (5095, 1810)}
GPU_RESULT = RESULTS / "gpu_paper_scale_cuda.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=19994)
    p.add_argument("--refs", type=int, default=50000)
    p.add_argument("--sentences", type=int, default=142210)
    p.add_argument("--root", type=Path, default=None, help="where to write the dataset (default: a temp folder)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--throughput-batches", type=int, default=8,
                   help="timed batches per worker count (at least 6 per worker, so prefetched batches do not count much)")
    p.add_argument("--canvas", type=int, default=640)
    p.add_argument("--compare-reference", action="store_true",
                   help="also measure the loader before the tensor rendering (benchmarks/loader_reference.py), "
                        "interleaved with the current one")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --compare-reference: timings of each loader per worker count, in ABBA order")
    p.add_argument("--output", type=Path, default=RESULTS / "data_scale.json")
    p.add_argument("--index-only", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def split_counts(refs: int, sentences: int) -> dict[str, tuple[int, int]]:
    """RefCOCO's split proportions scaled to ``refs`` refs and ``sentences`` expressions: split -> (sents, refs)."""
    total_sents = sum(s for s, _ in REFCOCO_SPLITS.values())
    total_refs = sum(r for _, r in REFCOCO_SPLITS.values())
    counts = {name: (max(1, round(s * sentences / total_sents)), max(1, round(r * refs / total_refs)))
              for name, (s, r) in REFCOCO_SPLITS.items()}
    return counts


def write_synthetic_refer(root: Path, images: int, refs: int, sentences: int) -> dict:
    """A refer layout with the given counts; every ref has >= 1 sentence, refs are spread over the images."""
    from PIL import Image

    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    width, height = 64, 48
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    image_rows = []
    for i in range(images):
        name = f"COCO_train2014_{i:012d}.jpg"
        (image_dir / name).write_bytes(jpeg)
        image_rows.append({"id": i, "file_name": name, "width": width, "height": height})
    ref_rows, annotations = [], []
    counts = split_counts(refs, sentences)
    for split, (split_sents, split_refs) in counts.items():
        per_ref, extra = divmod(split_sents, split_refs)
        for k in range(split_refs):
            ref_id = len(ref_rows)
            ann_id = ref_id
            annotations.append({"id": ann_id, "image_id": ref_id % images, "bbox": [4.0, 4.0, 30.0, 20.0]})
            n = max(1, per_ref + (1 if k < extra else 0))
            ref_rows.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": ref_id % images, "split": split,
                             "sentences": [{"sent": f"the object number {ref_id} seen {j}", "sent_id": 10 * ref_id + j}
                                           for j in range(n)]})
    base = root / "refcoco"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "refs(unc).p", "wb") as file:
        pickle.dump(ref_rows, file, protocol=2)
    (base / "instances.json").write_text(json.dumps({"images": image_rows, "annotations": annotations}))
    return {"images": images, "refs": len(ref_rows),
            "sentences": sum(len(r["sentences"]) for r in ref_rows), "splits": counts}


def index_in_this_process(root: Path) -> dict:
    """Build every split's index with `load_refer`; wall time, records and this process's peak RSS."""
    import datasets

    from peft_m2ist.data import load_refer

    datasets.disable_progress_bars()
    start = time.perf_counter()
    records = {split: len(load_refer(root, "refcoco", "unc", split).dataset) for split in REFCOCO_SPLITS}
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "records": records}


def measure_index(root: Path) -> dict:
    """`index_in_this_process` in a fresh interpreter, so the peak RSS is the index's alone."""
    out = subprocess.run([sys.executable, __file__, "--index-only", str(root)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_photo_refer(root: Path, copies: int = 40) -> Path:
    """The sample photographs resized to 640 x 480, ``copies`` files each, all in the train split (refer layout)."""
    from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS, write_refer_layout

    photos = [replace(photo.resized(640, 480, copy), split="train") for photo in SAMPLE_PHOTOS
              for copy in range(copies)]
    return write_refer_layout(root, photos=photos)


def time_loader(dataset, collator, count: int, batch_size: int, batches: int) -> dict:
    """Records/s of a shuffled DataLoader with ``count`` workers over ``dataset`` (its first batches included)."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=count, collate_fn=collator,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False, drop_last=True)
    # timed from the start, worker start-up included, over enough batches that the ones the workers prefetch
    # (2 each) are a small part: a lower bound on the steady rate
    wanted = max(batches, 6 * max(count, 1))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    seen, iterator = 0, iter(loader)
    for _ in range(wanted):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        seen += batch["pixel_values"].shape[0]
        del batch
    seconds = time.perf_counter() - start
    del iterator, loader
    return {"records_per_s": seen / seconds, "records": seen, "seconds": seconds,
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def pooled(timings: list[dict]) -> dict:
    """Several timings of one loader as one: total records over total seconds, each timing kept."""
    records, seconds = sum(t["records"] for t in timings), sum(t["seconds"] for t in timings)
    pooled_result = {"records_per_s": records / seconds, "records": records, "seconds": seconds}
    if len(timings) == 1:
        return {**pooled_result, "load_average_1min": timings[0]["load_average_1min"]}
    return {**pooled_result, "timings": timings}


def measure_throughput(root: Path, workers: list[int], batch_size: int, batches: int, canvas: int,
                       compare_reference: bool = False, rounds: int = 1) -> dict:
    """Records/s of a shuffled training DataLoader over the photo layout, per worker count.

    With ``compare_reference`` the reference loader (``benchmarks/loader_reference.py``) is timed too, in the order
    reference, current, current, reference, ... (``rounds`` timings each), and ``speedup`` is current / reference.
    """
    import datasets
    from transformers import AutoTokenizer

    from benchmarks.loader_reference import PILRECCollator
    from peft_m2ist.data import RECCollator, load_refer
    from peft_m2ist.pretrained.offline import minilm_path

    datasets.disable_progress_bars()
    dataset = load_refer(root, "refcoco", "unc", "train").dataset
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    collators = {"current": RECCollator(tokenizer, image_size=canvas, max_text_tokens=20, train=True)}
    if compare_reference:
        collators["reference"] = PILRECCollator(tokenizer, image_size=canvas, max_text_tokens=20, train=True)
    timings: dict[str, dict[str, list[dict]]] = {name: {} for name in collators}
    order = [name for r in range(rounds) for name in (("reference", "current") if r % 2 == 0 else
                                                      ("current", "reference"))] if compare_reference else ["current"]
    for count in workers:
        for name in order:
            timings[name].setdefault(str(count), []).append(
                time_loader(dataset, collators[name], count, batch_size, batches))
    out = {"records": len(dataset), "results": {k: pooled(v) for k, v in timings["current"].items()}}
    if compare_reference:
        out["reference"] = {"loader": "benchmarks/loader_reference.py (PILRECCollator)",
                            "results": {k: pooled(v) for k, v in timings["reference"].items()}}
        out["speedup"] = {k: out["results"][k]["records_per_s"] / out["reference"]["results"][k]["records_per_s"]
                          for k in out["results"]}
        out["rounds"] = rounds
    return out


def gpu_need(batch_size: int) -> dict | None:
    """Records/s that an M2IST training step at ``batch_size`` on the measured GPU consumes."""
    if not GPU_RESULT.is_file():
        return None
    data = json.loads(GPU_RESULT.read_text())
    step = data["methods"]["m2ist_shared_sum"]["step_time"]
    return {"gpu": data["machine"].get("gpu"), "step_s": step["median_s"], "batch_size": step["batch_size"],
            "records_per_s": step["batch_size"] / step["median_s"], "source": str(GPU_RESULT.relative_to(
                GPU_RESULT.parents[2]))}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.index_only is not None:
        print(json.dumps(index_in_this_process(args.index_only)))
        return {}
    import tempfile

    from benchmarks.environment import command_line

    load_at_start = os.getloadavg()[0]  # above the CPU count: other processes shared the cores
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        root = args.root or Path(tmp)
        start = time.perf_counter()
        counts = write_synthetic_refer(root / "synthetic", args.images, args.refs, args.sentences)
        write_seconds = time.perf_counter() - start
        index = measure_index(root / "synthetic")
        throughput = measure_throughput(write_photo_refer(root / "photos"), args.workers, args.batch_size,
                                        args.throughput_batches, args.canvas, args.compare_reference, args.rounds)
    need = gpu_need(args.batch_size)
    result = {
        "kind": "data_scale", "command": command_line(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min_at_start": load_at_start, "load_average_1min_at_end": os.getloadavg()[0]},
        "dataset": counts, "write_seconds": write_seconds, "index": index,
        "throughput": {"canvas": args.canvas, "batch_size": args.batch_size, "augment": True, **throughput},
        "gpu_need": need,
        "goals": {"index_under_60_s": index["seconds"] < 60, "index_under_2_gb": index["peak_rss_mb"] < 2048},
    }
    if need:
        best = max(r["records_per_s"] for r in throughput["results"].values())
        result["goals"]["loader_keeps_up_with_gpu_step"] = best >= need["records_per_s"]
    if "speedup" in throughput and "1" in throughput["speedup"]:
        result["goals"]["loader_2x_reference_per_worker"] = throughput["speedup"]["1"] >= 2.0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def print_table(result: dict) -> None:
    d, index = result["dataset"], result["index"]
    print(f"\nsynthetic refer layout: {d['images']:,} images, {d['refs']:,} refs, {d['sentences']:,} expressions")
    print("| measure | value | goal |\n| --- | --- | --- |")
    print(f"| index build, all splits | {index['seconds']:.1f} s | < 60 s |")
    print(f"| index peak RSS | {index['peak_rss_mb']:,.0f} MB | < 2,048 MB |")
    throughput = result["throughput"]
    reference = throughput.get("reference", {}).get("results", {})
    for workers, r in throughput["results"].items():
        if workers in reference:
            print(f"| loader before (PIL), {workers} worker(s), {throughput['canvas']} px, augment | "
                  f"{reference[workers]['records_per_s']:.0f} records/s | |")
        print(f"| loader, {workers} worker(s), {throughput['canvas']} px, augment | "
              f"{r['records_per_s']:.0f} records/s | |")
        if workers in throughput.get("speedup", {}):
            print(f"| speedup, {workers} worker(s) | {throughput['speedup'][workers]:.2f}x | >= 2x |")
    need = result["gpu_need"]
    if need:
        print(f"| M2IST step at batch {need['batch_size']} on {need['gpu']} consumes | "
              f"{need['records_per_s']:.0f} records/s | loader >= this |")
    print(f"\ngoals: {result['goals']}")


if __name__ == "__main__":
    main()
