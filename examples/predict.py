"""Run a trained M2IST adapter on an image and a phrase (or on validation samples) and draw the boxes.

    python examples/predict.py --adapter outputs/m2ist-shapes/best_adapter --image photo.png \\
        --phrase "the small red circle" --output prediction.png
    python examples/predict.py --adapter outputs/m2ist-shapes/best_adapter --val_samples 16 --output grid.png

The predicted box is drawn in red, the ground truth (validation samples) in green. The towers are the ones the
adapter was trained on, in the dtype it used, read from the `towers.json` that train_rec.py writes next to it;
pass --vision_model / --text_model (and --tower_dtype) for adapters saved otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from peft import PeftModel
from PIL import Image, ImageDraw
from transformers.image_transforms import center_to_corners_format

from peft_m2ist import VisionTextPair
from peft_m2ist.data import RECCollator, load_shapes_benchmark
from peft_m2ist.pretrained import (
    DEFAULT_TEXT_TOWER,
    DEFAULT_VISION_TOWER,
    TOWER_DTYPES,
    load_text_tower,
    load_vision_tower,
)

PRED, TRUTH = (230, 30, 30), (20, 170, 60)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="Folder written by save_pretrained (or a Hub id).")
    p.add_argument("--vision_model", default=None,
                   help=f"Vision tower; default: the one in the adapter's towers.json, else {DEFAULT_VISION_TOWER}.")
    p.add_argument("--text_model", default=None,
                   help=f"Text tower; default: the one in the adapter's towers.json, else {DEFAULT_TEXT_TOWER}.")
    p.add_argument("--tower_dtype", choices=sorted(TOWER_DTYPES), default=None,
                   help="dtype of the frozen towers; default: the one in the adapter's towers.json, else float32.")
    p.add_argument("--image", nargs="*", default=[], help="Image file(s); one --phrase per image.")
    p.add_argument("--phrase", nargs="*", default=[], help="Referring expression(s).")
    p.add_argument("--val_samples", type=int, default=0, help="Predict on the first N validation samples instead.")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--output", default="prediction.png", help="PNG to write (a grid for several samples).")
    args = p.parse_args(argv)
    if not args.val_samples and (not args.image or len(args.image) != len(args.phrase)):
        p.error("give --val_samples N, or as many --phrase as --image")
    towers_file = Path(args.adapter) / "towers.json"  # written by train_rec.py next to the adapter
    trained_on = json.loads(towers_file.read_text()) if towers_file.is_file() else {}
    args.vision_model = args.vision_model or trained_on.get("vision", DEFAULT_VISION_TOWER)
    args.text_model = args.text_model or trained_on.get("text", DEFAULT_TEXT_TOWER)
    args.tower_dtype = args.tower_dtype or trained_on.get("dtype", "float32")
    return args


def load_model(args: argparse.Namespace):
    vision, image_processor = load_vision_tower(args.vision_model)
    text, tokenizer = load_text_tower(args.text_model)
    vision.to(TOWER_DTYPES[args.tower_dtype])
    text.to(TOWER_DTYPES[args.tower_dtype])
    model = PeftModel.from_pretrained(VisionTextPair(vision, text), args.adapter).eval()
    return model, image_processor, tokenizer


def records(args: argparse.Namespace) -> list[dict]:
    if args.val_samples:
        val = load_shapes_benchmark(seed=args.data_seed)["val"]
        return [val[i] for i in range(min(args.val_samples, len(val)))]
    return [{"image": Image.open(path).convert("RGB"), "phrase": phrase}
            for path, phrase in zip(args.image, args.phrase)]


@torch.no_grad()
def predict(model, collator: RECCollator, rows: list[dict]) -> torch.Tensor:
    """Boxes `(n, 4)` as `[x0, y0, x1, y1]` pixels of each original image."""
    boxes = []
    for row in rows:
        width, height = row["image"].size
        batch = collator([dict(row, bbox=None)])  # the prediction needs no box: the batch then has no labels
        pred = model(**batch).pred_boxes[0].clamp(0, 1)
        scale = collator.image_size / max(width, height)  # the image sits top-left on the padded canvas
        boxes.append(center_to_corners_format(pred) * collator.image_size / scale)
    return torch.stack(boxes)


def draw(row: dict, box: torch.Tensor, size: int = 256) -> Image.Image:
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, image_processor, tokenizer = load_model(args)
    config = model.peft_config[model.active_adapter]
    collator = RECCollator.from_image_processor(tokenizer, image_processor, image_size=config.image_size,
                                                max_text_tokens=config.max_text_tokens)
    rows = records(args)
    boxes = predict(model, collator, rows)
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


if __name__ == "__main__":
    main()
