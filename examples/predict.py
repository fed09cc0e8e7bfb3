"""Run a trained M2IST adapter on images and phrases (or on validation samples) and draw the boxes.

    python examples/predict.py --adapter outputs/m2ist-shapes/best_adapter --image photo.jpg \\
        --phrase "the small red circle" --output prediction.png --output_json prediction.json
    python examples/predict.py --adapter outputs/m2ist-shapes/best_adapter --val_samples 16 --output grid.png

A command line over the library's inference API (`peft_m2ist.inference`): the predicted box is drawn in red, the
ground truth (validation samples) in green. Images are turned upright by their EXIF orientation tag first (as photo
viewers show phone photos, and so as whoever wrote the phrase saw them), so boxes are `[x0, y0, x1, y1]` in pixels
of the *displayed* image, clamped to it.

Towers: --vision_model / --text_model / --tower_dtype win where given; the rest comes from what the adapter records:
`base_towers` in its `adapter_config.json` (saved by `save_pretrained` and `push_to_hub`; for a Hub id, read from the
adapter's repository), or the `towers.json` of adapters saved before that. An adapter that records no towers needs
the flags; no default towers are guessed.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from peft_m2ist.data import load_shapes_benchmark
from peft_m2ist.data.visualize import TRUTH_COLOUR, draw_box
from peft_m2ist.inference import Grounding, ReferringExpressionGrounder, check_phrase, load_image
from peft_m2ist.loading import resolve_towers
from peft_m2ist.towers.quantization import TOWER_DTYPE_CHOICES
from peft_m2ist.training.atomic import write_json as write_json_atomic

logger = logging.getLogger("predict")

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


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="Folder written by save_pretrained (or a Hub id).")
    recorded = "the one the adapter records (adapter_config.json's base_towers, or an older adapter's towers.json)"
    p.add_argument("--vision_model", default=None, help=f"Vision tower; default: {recorded}.")
    p.add_argument("--text_model", default=None, help=f"Text tower; default: {recorded}.")
    p.add_argument("--tower_dtype", choices=TOWER_DTYPE_CHOICES, default=None,
                   help=f"dtype of the frozen towers; default: {recorded}, else float32.")
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
    """Parse and check the command line (images and phrases included), and settle the towers."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.val_samples is not None and (args.image or args.phrase):
        p.error("give either --val_samples N or --image/--phrase, not both")
    if args.val_samples is None and (not args.image or len(args.image) != len(args.phrase)):
        p.error("give --val_samples N, or as many --phrase as --image")
    for path in args.image:
        try:
            load_image(path)  # decodes all of it: a truncated file fails here, not after the towers are loaded
        except ValueError as err:
            p.error(f"--image {path}: {err}")
    for phrase in args.phrase:
        try:
            check_phrase(phrase)
        except ValueError as err:
            p.error(f"--phrase {phrase!r}: {err}")
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
    given = {key: getattr(args, flag) for key, flag in _FLAGS.items()}
    try:
        towers = resolve_towers(args.adapter, given["vision"], given["text"], given["dtype"])
    except ValueError as err:
        p.error(f"{err} (on this command line: --vision_model, --text_model and --tower_dtype)")
    for key, flag in _FLAGS.items():
        setattr(args, flag, towers[key])
    args.tower_sources = {key: f"--{flag}" if given[key] is not None else towers["source"]
                          for key, flag in _FLAGS.items()}
    return args


def describe_towers(args: argparse.Namespace) -> str:
    """One line naming the towers used and where each choice came from."""
    sources = getattr(args, "tower_sources", {})
    if len({sources.get(key) for key in _FLAGS}) == 1 and sources:
        common = ", ".join(f"{key} {getattr(args, flag)!r}" for key, flag in _FLAGS.items())
        return f"{common} ({sources['vision']})"
    return ", ".join(f"{key} {getattr(args, flag)!r} ({sources.get(key, '?')})" for key, flag in _FLAGS.items())


def load_model(args: argparse.Namespace) -> ReferringExpressionGrounder:
    """The adapter on its towers (`ReferringExpressionGrounder`), on `args.device`, in eval mode.

    Raises `ValueError` with a hint to pass --vision_model/--text_model when the adapter does not fit the towers.
    """
    logger.info("towers: %s", describe_towers(args))
    try:
        return ReferringExpressionGrounder.from_pretrained(
            args.adapter, vision_model=args.vision_model, text_model=args.text_model, dtype=args.tower_dtype,
            device=args.device)
    except ValueError as err:
        if "does not fit" not in str(err):
            raise
        raise ValueError(
            f"{err}\nThe adapter {args.adapter!r} was tried on these towers: {describe_towers(args)}. Pass the "
            "towers it was trained on with --vision_model and --text_model (and their dtype with --tower_dtype)."
        ) from err


def records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The samples to predict on: the first --val_samples validation samples, or the --image/--phrase pairs."""
    if args.val_samples is not None:
        val = load_shapes_benchmark(seed=args.data_seed)["val"]
        return [dict(val[i], val_index=i) for i in range(min(args.val_samples, len(val)))]
    return [{"image": load_image(path), "phrase": phrase, "path": path}
            for path, phrase in zip(args.image, args.phrase)]


def draw(row: dict[str, Any], grounding: Grounding, size: int = 256) -> Image.Image:
    """A `size`-wide panel: the image with the predicted (and ground-truth) box, the phrase underneath."""
    image = row["image"]
    if row.get("bbox"):
        image = draw_box(image, row["bbox"], TRUTH_COLOUR)
    image = draw_box(image, grounding.box)
    image.thumbnail((size, size))
    panel = Image.new("RGB", (size, size + 28), "white")
    panel.paste(image, (0, 0))
    ImageDraw.Draw(panel).text((4, size + 6), row["phrase"][:48], fill="black")
    return panel


def prediction_entries(rows: list[dict[str, Any]], groundings: list[Grounding]) -> list[dict[str, Any]]:
    """The `--output_json` list: one entry per sample (validation samples add their index and true box)."""
    entries = []
    for row, grounding in zip(rows, groundings):
        entry = {"image": row.get("path"), "phrase": row["phrase"],
                 "box_xyxy_pixels": list(grounding.box), "image_size": list(grounding.image_size)}
        if "val_index" in row:
            entry["val_index"] = row["val_index"]
            entry["true_box_xyxy_pixels"] = [float(c) for c in row["bbox"]] if row.get("bbox") else None
        entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> None:
    """Predict, write the JSON (--output_json) and the grid, print the boxes."""
    if not logger.handlers:  # this script's messages only, not every library's INFO logs
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    grounder = load_model(args)
    rows = records(args)
    try:
        groundings = grounder([row["image"] for row in rows], [row["phrase"] for row in rows])
    except ValueError as err:  # an image the model cannot read (1x1, 20000x20): say which, no traceback
        raise SystemExit(f"predict.py: {err}") from None
    for grounding in groundings:
        print(f"{grounding.phrase!r}: box [x0, y0, x1, y1] = {[round(c, 1) for c in grounding.box]}")
    if args.output_json:  # first: a drawing problem must not lose the boxes
        write_json_atomic(Path(args.output_json), prediction_entries(rows, groundings))
        print(f"wrote {args.output_json}")
    panels = [draw(row, grounding) for row, grounding in zip(rows, groundings)]
    cols = min(4, len(panels))
    grid = Image.new("RGB", (cols * 256, math.ceil(len(panels) / cols) * 284), "white")
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % cols) * 256, (i // cols) * 284))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
