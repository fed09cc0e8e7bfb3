"""Ground phrases in images with an exported M2IST bundle, in onnxruntime, without torch.

    python examples/export_onnx.py --adapter outputs/m2ist-shapes/best_adapter --output outputs/m2ist-shapes/onnx
    python examples/onnx_predict.py --bundle outputs/m2ist-shapes/onnx --image photo.jpg --phrase "the red circle"

Needs only numpy, pillow, onnxruntime and transformers' tokenizers (no torch): the bundle holds ``model.onnx``, the
tokenizer and ``preprocessing.json`` (`peft_m2ist.export.export_adapter`). The inputs are built as
`peft_m2ist.data.RECCollator` builds them for prediction: the image turned upright (EXIF), its long side resized to
the canvas size (bilinear), placed at the canvas's top-left, normalised with the image processor's mean and std,
padding 0 with ``pixel_mask`` 0; the phrase tokenized and padded to ``max_text_tokens``. Prints one JSON line per
phrase with the box ``[x0, y0, x1, y1]`` in pixels of the image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps
from transformers import AutoTokenizer

MODEL, PREPROCESSING = "model.onnx", "preprocessing.json"


class OnnxGrounder:
    """An exported bundle, loaded: ``grounder(images, phrases)`` -> boxes ``[x0, y0, x1, y1]`` in image pixels."""

    def __init__(self, bundle: str | Path) -> None:
        bundle = Path(bundle)
        self.prep = json.loads((bundle / PREPROCESSING).read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle))
        self.session = onnxruntime.InferenceSession(str(bundle / MODEL), providers=["CPUExecutionProvider"])

    def canvas(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """`(3, S, S)` float32 normalised pixels and the `(S, S)` int64 mask of one RGB image."""
        size = int(self.prep["image_size"])
        width, height = image.size
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        if new != (width, height):
            image = image.resize(new, Image.Resampling.BILINEAR)
        mean = np.asarray(self.prep["image_mean"], dtype=np.float32).reshape(1, 1, 3)
        std = np.asarray(self.prep["image_std"], dtype=np.float32).reshape(1, 1, 3)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
        pixels = np.zeros((size, size, 3), dtype=np.float32)
        mask = np.zeros((size, size), dtype=np.int64)
        pixels[: array.shape[0], : array.shape[1]] = array
        mask[: array.shape[0], : array.shape[1]] = 1
        return pixels.transpose(2, 0, 1), mask

    def inputs(self, images: list[Image.Image], phrases: list[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch: ``pixel_values``, ``pixel_mask``, ``input_ids``, ``attention_mask``."""
        pixels, masks = zip(*(self.canvas(image) for image in images))
        text = self.tokenizer(phrases, padding="max_length", truncation=True,
                              max_length=int(self.prep["max_text_tokens"]), return_tensors="np")
        return {"pixel_values": np.stack(pixels), "pixel_mask": np.stack(masks),
                "input_ids": text["input_ids"].astype(np.int64),
                "attention_mask": text["attention_mask"].astype(np.int64)}

    def __call__(self, images: list[Image.Image], phrases: list[str]) -> list[list[float]]:
        boxes = self.session.run(["pred_boxes"], self.inputs(images, phrases))[0]
        results = []
        for image, (cx, cy, w, h) in zip(images, boxes.astype(np.float64)):
            width, height = image.size
            side = max(width, height)
            corners = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * side
            results.append(np.minimum(corners.clip(min=0), [width, height, width, height]).tolist())
        return results


def open_image(path: str | Path) -> Image.Image:
    with Image.open(path) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="the folder examples/export_onnx.py wrote")
    parser.add_argument("--image", required=True)
    parser.add_argument("--phrase", required=True, action="append", help="repeat for several phrases")
    args = parser.parse_args(argv)
    grounder = OnnxGrounder(args.bundle)
    image = open_image(args.image)
    boxes = grounder([image] * len(args.phrase), args.phrase)
    found = [{"phrase": phrase, "box_xyxy_pixels": box, "image_size": list(image.size)}
             for phrase, box in zip(args.phrase, boxes)]
    for line in found:
        print(json.dumps(line))
    return found


if __name__ == "__main__":
    main()
