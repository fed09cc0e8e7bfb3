"""Run a trained M2IST adapter on an image and a phrase (or on validation samples) and draw the boxes.

    python examples/predict.py --adapter outputs/m2ist-shapes/best_adapter --image photo.jpg \\
        --phrase "the small red circle" --output prediction.png --output_json prediction.json
    python examples/predict.py --adapter outputs/m2ist-shapes/best_adapter --val_samples 16 --output grid.png

The predicted box is drawn in red, the ground truth (validation samples) in green. Images are turned upright by
their EXIF orientation tag first (as photo viewers show phone photos, and so as whoever wrote the phrase saw them),
so boxes are `[x0, y0, x1, y1]` in pixels of the *displayed* image (width and height swapped for a photo stored
sideways), clamped to that image.

Towers: --vision_model / --text_model / --tower_dtype win where given; the rest comes from the `towers.json` that
train_rec.py writes next to its adapters (for a Hub id, downloaded from the adapter's repository when it has one);
without it, the training example's default towers (examples/configs/default.yaml: the stride-16 cut of the offline
MobileNetV2 and MiniLM-L6, float32). An adapter trained on other towers and saved without `towers.json` needs the
flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from PIL import Image, ImageDraw, ImageOps
from transformers.image_transforms import center_to_corners_format

from peft_m2ist import VisionTextPair
from peft_m2ist.data import RECCollator, load_shapes_benchmark
from peft_m2ist.pretrained import (
    DEFAULT_TEXT_TOWER,
    MOBILENET_V2_STRIDE16_TOWER,
    TOWER_DTYPES,
    load_text_tower,
    load_vision_tower,
)
from peft_m2ist.training.atomic import write_json as write_json_atomic

logger = logging.getLogger("predict")

PRED, TRUTH = (230, 30, 30), (20, 170, 60)
TOWERS_FILE = "towers.json"
"""Written by train_rec.py next to each adapter it saves: the towers (and their dtype) it was trained on."""
FALLBACK_TOWERS = {"vision": MOBILENET_V2_STRIDE16_TOWER, "text": DEFAULT_TEXT_TOWER, "dtype": "float32"}
"""The towers of the training example's default config (examples/configs/default.yaml), for adapters without
`towers.json`."""
_FLAGS = {"vision": "vision_model", "text": "text_model", "dtype": "tower_dtype"}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` in RGB, turned upright by its EXIF orientation tag (as it is displayed)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _check_image(path: str) -> str | None:
    """Why `path` is not a readable image, or `None` when it is one."""
    if not Path(path).exists():
        return "no such file"
    if not Path(path).is_file():
        return "not a file"
    try:
        open_image(path)  # decodes all of it: a truncated file fails here, not after the towers are loaded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


def read_towers_file(adapter: str) -> tuple[dict[str, Any], str] | None:
    """The adapter's `towers.json` and where it was read from, or `None` when there is none.

    A local adapter folder is only looked into; for anything else (a Hub id) the file is fetched with
    `hf_hub_download`, and any failure there (no such file or repository, offline, no network) counts as absent.
    Raises `ValueError` for a local `towers.json` that is not a JSON object.
    """
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        path = folder / TOWERS_FILE
        if not path.is_file():
            return None
        try:
            towers = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not readable JSON: {err}") from None
        if not isinstance(towers, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(towers).__name__}")
        return towers, str(path)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=adapter, filename=TOWERS_FILE)
        towers = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as err:  # any failure to fetch or parse it means "no towers.json"
        logger.debug("no %s fetched for %r: %s: %s", TOWERS_FILE, adapter, type(err).__name__, err)
        return None
    return (towers, f"{adapter}/{TOWERS_FILE}") if isinstance(towers, dict) else None


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="Folder written by save_pretrained (or a Hub id).")
    p.add_argument("--vision_model", default=None,
                   help=f"Vision tower; default: the one in the adapter's {TOWERS_FILE}, else "
                   f"{FALLBACK_TOWERS['vision']}.")
    p.add_argument("--text_model", default=None,
                   help=f"Text tower; default: the one in the adapter's {TOWERS_FILE}, else {FALLBACK_TOWERS['text']}.")
    p.add_argument("--tower_dtype", choices=sorted(TOWER_DTYPES), default=None,
                   help=f"dtype of the frozen towers; default: the one in the adapter's {TOWERS_FILE}, else "
                   f"{FALLBACK_TOWERS['dtype']}.")
    p.add_argument("--image", nargs="*", default=[],
                   help="Image file(s); one --phrase per image. Turned upright by their EXIF orientation first: "
                   "boxes are in pixels of the image as displayed.")
    p.add_argument("--phrase", nargs="*", default=[], help="Referring expression(s), one per --image.")
    p.add_argument("--val_samples", type=positive_int, default=None,
                   help="Predict on the first N validation samples of the shapes benchmark instead of --image/--phrase.")
    p.add_argument("--data_seed", type=int, default=0, help="Seed of the shapes benchmark (--val_samples).")
    p.add_argument("--device", default=None,
                   help="Device to run on, e.g. cpu, cuda, cuda:1; default: cuda if available, else cpu.")
    p.add_argument("--output", default="prediction.png", help="PNG to write (a grid for several samples).")
    p.add_argument("--output_json", default=None, metavar="PATH",
                   help="Also write the boxes as JSON: a list of {image, phrase, box_xyxy_pixels, image_size} "
                   "(box in pixels of the displayed image; image_size is its [width, height]; image is the --image "
                   "path, or null for validation samples, which add val_index and true_box_xyxy_pixels).")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (images included), and settle the towers; see the module docstring."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.val_samples is not None and (args.image or args.phrase):
        p.error("give either --val_samples N or --image/--phrase, not both")
    if args.val_samples is None and (not args.image or len(args.image) != len(args.phrase)):
        p.error("give --val_samples N, or as many --phrase as --image")
    for path in args.image:
        problem = _check_image(path)
        if problem:
            p.error(f"--image {path}: {problem}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    args.device = device

    explicit = {key: getattr(args, flag) for key, flag in _FLAGS.items() if getattr(args, flag) is not None}
    found = None if len(explicit) == len(_FLAGS) else _read_towers_file_or_error(p, args.adapter)
    trained_on, source = found if found else ({}, None)
    sources = {}
    for key, flag in _FLAGS.items():
        if key in explicit:
            value, sources[key] = explicit[key], f"--{flag}"
        elif key in trained_on:
            value, sources[key] = trained_on[key], source
        else:
            value, sources[key] = FALLBACK_TOWERS[key], (f"default: not in {source}" if source else
                                                         f"default: no {TOWERS_FILE} with the adapter")
        setattr(args, flag, value)
    if args.tower_dtype not in TOWER_DTYPES:
        p.error(f"tower dtype {args.tower_dtype!r} ({sources['dtype']}) is not one of {sorted(TOWER_DTYPES)}")
    args.tower_sources = sources
    return args


def _read_towers_file_or_error(p: argparse.ArgumentParser, adapter: str) -> tuple[dict[str, Any], str] | None:
    """`read_towers_file`, with a broken local `towers.json` reported as an argparse error."""
    try:
        return read_towers_file(adapter)
    except ValueError as err:
        p.error(f"{err}; fix it, or pass --vision_model, --text_model and --tower_dtype")


def describe_towers(args: argparse.Namespace) -> str:
    """One line naming the towers used and where each choice came from."""
    sources = getattr(args, "tower_sources", {})
    if len({sources.get(key) for key in _FLAGS}) == 1 and sources:
        common = ", ".join(f"{key} {getattr(args, flag)!r}" for key, flag in _FLAGS.items())
        return f"{common} ({sources['vision']})"
    return ", ".join(f"{key} {getattr(args, flag)!r} ({sources.get(key, '?')})" for key, flag in _FLAGS.items())


def load_model(args: argparse.Namespace) -> tuple[PeftModel, Any, Any]:
    """The towers with the adapter on them, on `args.device` and in eval mode, plus image processor and tokenizer.

    Raises `ValueError` with a hint to pass --vision_model/--text_model when the adapter does not fit the towers.
    """
    logger.info("towers: %s", describe_towers(args))
    vision, image_processor = load_vision_tower(args.vision_model)
    text, tokenizer = load_text_tower(args.text_model)
    vision.to(TOWER_DTYPES[args.tower_dtype])
    text.to(TOWER_DTYPES[args.tower_dtype])
    try:
        model = PeftModel.from_pretrained(VisionTextPair(vision, text), args.adapter)
    except ValueError as err:
        if "does not fit" not in str(err):
            raise
        raise ValueError(
            f"{err}\nThe adapter {args.adapter!r} was tried on these towers: {describe_towers(args)}. Pass the "
            "towers it was trained on with --vision_model and --text_model (and their dtype with --tower_dtype)."
        ) from err
    return model.to(args.device).eval(), image_processor, tokenizer


def records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The samples to predict on: the first --val_samples validation samples, or the --image/--phrase pairs."""
    if args.val_samples is not None:
        val = load_shapes_benchmark(seed=args.data_seed)["val"]
        return [dict(val[i], val_index=i) for i in range(min(args.val_samples, len(val)))]
    return [{"image": open_image(path), "phrase": phrase, "path": path}
            for path, phrase in zip(args.image, args.phrase)]


@torch.no_grad()
def predict(model: PeftModel, collator: RECCollator, rows: list[dict[str, Any]],
            device: torch.device | str | None = None) -> torch.Tensor:
    """Boxes `(n, 4)` as `[x0, y0, x1, y1]` pixels of each original image, clamped to it (on the CPU)."""
    if device is None:
        device = next(model.parameters()).device
    boxes = []
    for row in rows:
        width, height = row["image"].size
        batch = collator([dict(row, bbox=None)])  # the prediction needs no box: the batch then has no labels
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        pred = model(**batch).pred_boxes[0].float().cpu()
        # the image, its long side resized to the canvas side, sits top-left on the padded square canvas: canvas
        # fractions times the long side are pixels of the original image
        corners = center_to_corners_format(pred) * max(width, height)
        limits = torch.tensor([width, height, width, height], dtype=corners.dtype)
        boxes.append(torch.minimum(corners.clamp(min=0), limits))
    return torch.stack(boxes)


def draw(row: dict[str, Any], box: torch.Tensor, size: int = 256) -> Image.Image:
    """A `size`-wide panel: the image with the predicted (and ground-truth) box, the phrase underneath."""
    image = row["image"].copy()
    factor = size / max(image.size)
    image = image.resize((round(image.width * factor), round(image.height * factor)))
    canvas = ImageDraw.Draw(image)
    if row.get("bbox"):
        canvas.rectangle([c * factor for c in row["bbox"]], outline=TRUTH, width=2)
    canvas.rectangle([float(c) * factor for c in box], outline=PRED, width=2)
    panel = Image.new("RGB", (size, size + 28), "white")
    panel.paste(image, (0, 0))
    ImageDraw.Draw(panel).text((4, size + 6), row["phrase"][:48], fill="black")
    return panel


def prediction_entries(rows: list[dict[str, Any]], boxes: torch.Tensor) -> list[dict[str, Any]]:
    """The `--output_json` list: one entry per sample (validation samples add their index and true box)."""
    entries = []
    for row, box in zip(rows, boxes):
        entry = {"image": row.get("path"), "phrase": row["phrase"],
                 "box_xyxy_pixels": [float(c) for c in box], "image_size": list(row["image"].size)}
        if "val_index" in row:
            entry["val_index"] = row["val_index"]
            entry["true_box_xyxy_pixels"] = [float(c) for c in row["bbox"]] if row.get("bbox") else None
        entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> None:
    """Predict, draw the grid, print the boxes (and write them as JSON with --output_json)."""
    if not logger.handlers:  # this script's messages only, not every library's INFO logs
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    model, image_processor, tokenizer = load_model(args)
    config = model.peft_config[model.active_adapter]
    collator = RECCollator.from_image_processor(tokenizer, image_processor, image_size=config.image_size,
                                                max_text_tokens=config.max_text_tokens)
    rows = records(args)
    boxes = predict(model, collator, rows, args.device)
    panels = [draw(row, box) for row, box in zip(rows, boxes)]
    cols = min(4, len(panels))
    grid = Image.new("RGB", (cols * 256, math.ceil(len(panels) / cols) * 284), "white")
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % cols) * 256, (i // cols) * 284))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    for row, box in zip(rows, boxes):
        print(f"{row['phrase']!r}: box [x0, y0, x1, y1] = {[round(float(c), 1) for c in box]}")
    print(f"wrote {args.output}")
    if args.output_json:
        write_json_atomic(args.output_json, prediction_entries(rows, boxes))
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
