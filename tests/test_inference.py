"""The inference API on tiny towers saved to tmp_path: one call, batches, tower choice (the adapter's record, its
older towers.json, or the arguments; never default towers), pixel boxes, bad input."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from tiny_adapter import save_tiny_adapter
from transformers.image_transforms import center_to_corners_format

from peft_m2ist.data import RECCollator
from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS
from peft_m2ist.inference import (
    DEFAULT_ADAPTER,
    Grounding,
    ReferringExpressionGrounder,
    ground,
    load_image,
)
from peft_m2ist.loading import resolve_towers
from peft_m2ist.pretrained.towers_file import TOWERS_FILE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    return save_tiny_adapter(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def grounder(tiny) -> ReferringExpressionGrounder:
    return ReferringExpressionGrounder.from_pretrained(tiny.adapter, device="cpu")


def expected_box(tiny, image: Image.Image, phrase: str) -> list[float]:
    """The model's own answer, computed here without the inference API: canvas box -> image pixels."""
    processor = tf.MobileNetV2ImageProcessor.from_pretrained(tiny.vision)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny.text)
    config = tiny.model.peft_config["default"]
    collator = RECCollator.from_image_processor(tokenizer, processor, image_size=config.image_size,
                                                max_text_tokens=config.max_text_tokens)
    batch = collator([{"image": image, "phrase": phrase}])
    with torch.no_grad():
        pred = tiny.model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}).pred_boxes[0]
    corners = center_to_corners_format(pred) * max(image.size)
    width, height = image.size
    return torch.minimum(corners.clamp(min=0), torch.tensor([width, height, width, height])).tolist()


def test_one_call_gives_the_models_box_in_image_pixels(tiny, grounder):
    photo = SAMPLE_PHOTOS[3]  # chelsea, the cat
    image = photo.image()
    result = grounder(image, "the eye on the right")
    assert isinstance(result, Grounding) and result.image_size == image.size
    assert result.box == pytest.approx(expected_box(tiny, image, "the eye on the right"), abs=1e-4)
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
    assert result.box_normalized == pytest.approx([x0 / image.width, y0 / image.height, x1 / image.width,
                                                   y1 / image.height])
    assert ground(image, "the eye on the right", adapter=tiny.adapter, device="cpu") == result


def test_paths_arrays_and_lists_give_the_same_boxes(tiny, grounder, tmp_path):
    image = SAMPLE_PHOTOS[4].image()  # coffee
    path = tmp_path / "coffee.png"
    image.save(path)
    phrases = ["the cup of coffee", "the spoon on the right"]
    from_image = grounder(image, phrases)
    assert [r.phrase for r in from_image] == phrases
    assert grounder(str(path), phrases) == from_image
    assert grounder(np.asarray(image), phrases) == from_image
    assert grounder(np.asarray(image).astype(np.float32) / 255.0, phrases) == from_image
    pair = grounder([image, SAMPLE_PHOTOS[2].image()], ["the cup of coffee", "top left coin"], batch_size=1)
    assert pair[0].box == pytest.approx(from_image[0].box, abs=1e-3)  # batch of one vs two: float rounding only
    assert pair[1].image_size == SAMPLE_PHOTOS[2].image().size


def test_exif_rotated_photos_are_grounded_as_displayed(grounder, tmp_path):
    image = Image.new("RGB", (60, 20), (200, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60x20, displayed 20x60
    image.save(tmp_path / "sideways.jpg", exif=exif)
    assert load_image(tmp_path / "sideways.jpg").size == (20, 60)
    assert grounder(tmp_path / "sideways.jpg", "the red thing").image_size == (20, 60)


def test_16_bit_images_are_scaled_not_whitened():
    image = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))
    assert np.all(np.asarray(load_image(image)) == 128)


def _config_without_record(tiny, folder):
    """`folder` holding the tiny adapter's files with an adapter_config.json as saved before `base_towers` existed."""
    shutil.copytree(tiny.adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["base_towers"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_towers_come_from_arguments_then_the_adapters_record(tiny):
    recorded = resolve_towers(str(tiny.adapter))
    assert (recorded["vision"], recorded["text"], recorded["dtype"]) == (str(tiny.vision), str(tiny.text), "float32")
    assert recorded["source"] == "adapter_config.json (base_towers)"
    mixed = resolve_towers(str(tiny.adapter), vision_model="offline:mobilenet_v2", dtype=torch.bfloat16)
    assert (mixed["vision"], mixed["text"], mixed["dtype"]) == ("offline:mobilenet_v2", str(tiny.text), "bfloat16")


def test_an_adapter_saved_before_the_record_reads_its_towers_json(tiny, tmp_path):
    old = _config_without_record(tiny, tmp_path / "old")
    (old / TOWERS_FILE).write_text(json.dumps({"vision": str(tiny.vision), "text": str(tiny.text),
                                               "dtype": "float32"}))
    towers = resolve_towers(str(old))
    assert (towers["vision"], towers["text"], towers["dtype"]) == (str(tiny.vision), str(tiny.text), "float32")
    assert towers["source"].endswith(TOWERS_FILE)
    image = SAMPLE_PHOTOS[3].image()
    old_grounder = ReferringExpressionGrounder.from_pretrained(old, device="cpu")
    assert old_grounder(image, "the cat").box == pytest.approx(expected_box(tiny, image, "the cat"), abs=1e-4)


def test_an_adapter_without_a_record_is_refused_naming_the_arguments_not_given_default_towers(tiny, tmp_path):
    bare = _config_without_record(tiny, tmp_path / "bare")
    with pytest.raises(ValueError, match=r"does not record its vision and text tower.*pass vision_model= and "
                                         r"text_model="):
        ReferringExpressionGrounder.from_pretrained(bare, device="cpu")
    with pytest.raises(ValueError, match=r"does not record its text tower.*pass text_model="):
        resolve_towers(str(bare), vision_model=str(tiny.vision))
    given = ReferringExpressionGrounder.from_pretrained(bare, vision_model=str(tiny.vision),
                                                        text_model=str(tiny.text), device="cpu")
    assert given.towers["source"] == "given"
    image = SAMPLE_PHOTOS[3].image()
    assert given(image, "the cat").box == pytest.approx(expected_box(tiny, image, "the cat"), abs=1e-4)


@pytest.mark.parametrize("image,phrase,message", [
    ("missing.png", "the cat", "no such file"),
    ("not_an_image.png", "the cat", "not a readable image"),
    (Image.new("RGB", (1, 1)), "the cat", "1x1 pixels: too small"),
    (Image.new("RGB", (20000, 20)), "the cat", "short side would be under one pixel"),
    (Image.new("RGB", (40, 30)), "   ", "the phrase is empty"),
    (Image.new("RGB", (40, 30)), "", "the phrase is empty"),
    (np.zeros((4, 4, 5), dtype=np.uint8), "the cat", "channels"),
    (12, "the cat", "expected an image path"),
])
def test_bad_input_is_a_clear_value_error(grounder, tmp_path, image, phrase, message):
    (tmp_path / "not_an_image.png").write_text("hello")
    if isinstance(image, str):
        image = tmp_path / image
    with pytest.raises(ValueError, match=message):
        grounder(image, phrase)


def test_mismatched_lists_are_refused(grounder):
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="2 images but 3 phrases"):
        grounder([image, image], ["a", "b", "c"])


def test_a_missing_adapter_or_towers_that_do_not_load_are_named(tiny, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"no adapter at .*nowhere.*save_pretrained"):
        ReferringExpressionGrounder.from_pretrained(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)  # no outputs/ here: the README's main job has not run
    with pytest.raises(ValueError, match="run the README's main job first"):
        ReferringExpressionGrounder.from_pretrained(DEFAULT_ADAPTER)
    with pytest.raises(ValueError, match="cannot load the towers"):
        ReferringExpressionGrounder.from_pretrained(tiny.adapter, vision_model=str(tmp_path / "no_such_tower"))


class _FixedBoxes(torch.nn.Module):
    """Predicts the same normalised cxcywh box for every sample."""

    def __init__(self, box: list[float]):
        super().__init__()
        self.box = torch.nn.Parameter(torch.tensor(box), requires_grad=False)

    def forward(self, **batch) -> SimpleNamespace:
        return SimpleNamespace(pred_boxes=self.box.expand(batch["pixel_values"].shape[0], 4))


@pytest.mark.parametrize("size", [(200, 50), (50, 200)])
def test_boxes_are_clamped_to_the_image_not_the_padded_canvas(tiny, size):
    collator = RECCollator(tf.AutoTokenizer.from_pretrained(tiny.text), image_size=32, max_text_tokens=6)
    image = Image.new("RGB", size)

    def box(pred: list[float]) -> list[float]:
        return list(ReferringExpressionGrounder(_FixedBoxes(pred), collator, torch.device("cpu"), {})(
            image, "everything").box)

    assert box([0.5, 0.5, 1.0, 1.0]) == [0.0, 0.0, float(size[0]), float(size[1])]  # the whole canvas
    long_side = max(size)  # a box half outside the canvas
    expected = [min(0.7 * long_side, size[0]), min(0.7 * long_side, size[1]), float(size[0]), float(size[1])]
    assert box([0.9, 0.9, 0.4, 0.4]) == pytest.approx(expected)
