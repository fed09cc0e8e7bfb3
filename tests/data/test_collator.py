"""The collator's batch (names, shapes, dtypes, box format) and the modality controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from transformers import BertTokenizerFast, ViTImageProcessor
from transformers.image_transforms import center_to_corners_format
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from peft_m2ist.data import RECCollator, apply_control

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "square", "left", "of", "circle", "a"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def grey_record(width: int, height: int, bbox, phrase="the red square", phrase_type="attribute") -> dict:
    return {"image": PILImage.new("RGB", (width, height), (128, 128, 128)), "bbox": bbox, "phrase": phrase,
            "phrase_type": phrase_type}


def test_batch_names_shapes_and_dtypes(tokenizer):
    collator = RECCollator(tokenizer, image_size=100, max_text_tokens=6)
    batch = collator([grey_record(200, 100, [50, 20, 150, 60]),
                      grey_record(40, 80, [0, 0, 40, 80], "the circle left of the red square a a", "relation")])
    assert batch["pixel_values"].shape == (2, 3, 100, 100) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_mask"].shape == (2, 100, 100) and batch["pixel_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].shape == (2, 6)
    assert batch["labels"].shape == (2, 4) and batch["labels"].dtype == torch.float32
    assert batch["phrase_type"] == ["attribute", "relation"]
    # 200x100 -> 100x50 at the top-left: box [25, 10, 75, 30] -> cxcywh / 100
    assert torch.allclose(batch["labels"][0], torch.tensor([0.5, 0.2, 0.5, 0.2]))
    # 40x80 -> 50x100, the box is the whole image
    assert torch.allclose(batch["labels"][1], torch.tensor([0.25, 0.5, 0.5, 1.0]))
    assert batch["pixel_mask"][0, :50].all() and not batch["pixel_mask"][0, 50:].any()
    assert batch["pixel_mask"][1, :, :50].all() and not batch["pixel_mask"][1, :, 50:].any()
    # text: padded to max length for the short phrase, truncated (ends in [SEP]) for the long one
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["attention_mask"][1].all() and batch["input_ids"][1, -1] == tokenizer.sep_token_id


def test_normalisation_and_zero_padding(tokenizer):
    batch = RECCollator(tokenizer, image_size=64)([grey_record(64, 32, [0, 0, 10, 10])])
    expected = (128 / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    assert torch.allclose(batch["pixel_values"][0, :, 5, 5], expected, atol=1e-6)
    assert (batch["pixel_values"][0, :, 32:] == 0).all()


def test_image_processor_mean_and_std(tokenizer):
    processor = ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    collator = RECCollator.from_image_processor(tokenizer, processor, image_size=32)
    value = collator([grey_record(32, 32, [0, 0, 8, 8])])["pixel_values"][0, 0, 0, 0]
    assert value == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-6)


def test_train_mode_is_seeded_and_box_stays_on_the_image(tokenizer):
    records = [grey_record(90, 60, [10, 10, 40, 30], "the circle"), grey_record(60, 90, [5, 50, 55, 85], "a")]
    first = RECCollator(tokenizer, image_size=64, train=True, seed=7)(records)
    second = RECCollator(tokenizer, image_size=64, train=True, seed=7)(records)
    for key in ("pixel_values", "pixel_mask", "labels", "input_ids"):
        assert torch.equal(first[key], second[key])
    corners = center_to_corners_format(first["labels"]) * 64
    for mask, (x0, y0, x1, y1) in zip(first["pixel_mask"], corners.tolist()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() - 1e-4 <= x0 < x1 <= xs.max() + 1 + 1e-4
        assert ys.min() - 1e-4 <= y0 < y1 <= ys.max() + 1 + 1e-4


def test_augment_size_must_match(tokenizer):
    from peft_m2ist.data import TrainAugment

    with pytest.raises(ValueError):
        RECCollator(tokenizer, image_size=64, augment=TrainAugment(32))


def small_dataset() -> Dataset:
    features = Features({"image": Image(mode="RGB"), "bbox": List(Value("float64"), length=4),
                         "phrase": Value("string"), "phrase_type": Value("string")})
    images = [PILImage.fromarray(np.full((20, 30, 3), v, dtype=np.uint8)) for v in (10, 200)]
    return Dataset.from_dict({"image": images, "bbox": [[1, 2, 10, 12], [0, 0, 30, 20]],
                              "phrase": ["the red square", "a circle"], "phrase_type": ["a", "b"]},
                             features=features)


def test_text_hidden_control():
    data = small_dataset()
    hidden = apply_control(data, "text_hidden")
    assert hidden["phrase"] == ["", ""]
    assert hidden["bbox"] == data["bbox"]
    assert np.array_equal(np.asarray(hidden[1]["image"]), np.asarray(data[1]["image"]))


def test_image_hidden_control():
    data = small_dataset()
    hidden = apply_control(data, "image_hidden")
    assert hidden["phrase"] == data["phrase"] and hidden["bbox"] == data["bbox"]
    for image in hidden["image"]:
        assert image.size == (30, 20)
        assert (np.asarray(image) == 128).all()


def test_unknown_control_is_refused():
    assert apply_control(small_dataset(), "none")["phrase"] == ["the red square", "a circle"]
    with pytest.raises(ValueError, match="control"):
        apply_control(small_dataset(), "audio_hidden")


def test_records_without_a_box_give_a_batch_without_labels(tokenizer):
    """Prediction: no `bbox` key (or `bbox=None`) -> the same images and text as with a box, and no `labels`."""
    collator = RECCollator(tokenizer, image_size=100, max_text_tokens=6)
    boxed = [grey_record(200, 100, [50, 20, 150, 60]), grey_record(40, 80, [0, 0, 40, 80], "a circle", "relation")]
    without_key = [{k: v for k, v in record.items() if k != "bbox"} for record in boxed]
    with_none = [dict(record, bbox=None) for record in boxed]
    reference = collator(boxed)
    for records in (without_key, with_none):
        batch = collator(records)
        assert "labels" not in batch
        assert list(batch) == ["pixel_values", "pixel_mask", "input_ids", "attention_mask", "phrase_type"]
        for key in ("pixel_values", "pixel_mask", "input_ids", "attention_mask"):
            assert torch.equal(batch[key], reference[key]), key
        assert batch["phrase_type"] == ["attribute", "relation"]
    sample = collator.transform(with_none[0])
    assert sample.bbox is None and sample.offset == (0, 0) and sample.image.size == (100, 50)
    # phrase_type is optional too
    assert collator([{"image": boxed[0]["image"], "phrase": "a"}])["phrase_type"] == ["unknown"]


def test_a_batch_mixing_records_with_and_without_a_box_is_refused(tokenizer):
    collator = RECCollator(tokenizer, image_size=64)
    records = [grey_record(64, 64, [0, 0, 10, 10]), grey_record(64, 64, None), {"image": PILImage.new("RGB", (8, 8)),
                                                                                "phrase": "a"}]
    with pytest.raises(ValueError, match=r"records \[1, 2\] of this batch have no `bbox`.*others have one"):
        collator(records)


def test_training_needs_a_box_in_every_record(tokenizer):
    """The augmentation crops around the target box and moves it: train=True refuses box-less records."""
    collator = RECCollator(tokenizer, image_size=64, train=True, seed=0)
    with pytest.raises(ValueError, match=r"records \[0\] .*train=True\) needs a `bbox`"):
        collator([grey_record(64, 64, None)])
    with pytest.raises(ValueError, match=r"records \[1\] .*train=True\) needs a `bbox`"):
        collator([grey_record(64, 64, [0, 0, 10, 10]), grey_record(64, 64, None)])
    with pytest.raises(ValueError, match="needs a `bbox`"):
        collator.transform({"image": PILImage.new("RGB", (8, 8)), "phrase": "a"})
    # the refusals drew nothing from the collator's generator: the next batch is the one a fresh collator makes
    records = [grey_record(90, 60, [10, 10, 40, 30], "the circle")]
    fresh = RECCollator(tokenizer, image_size=64, train=True, seed=0)(records)
    assert torch.equal(collator(records)["labels"], fresh["labels"])


def test_a_box_that_is_not_four_numbers_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"`bbox` must be 4 numbers"):
        RECCollator(tokenizer, image_size=64)([grey_record(64, 64, [0, 0, 10])])


@pytest.mark.parametrize("bbox,message", [
    ([1.0, 2.0, float("inf"), 10.0], "4 numbers .*all finite"),
    ([1.0, 2.0, float("nan"), 10.0], "4 numbers .*all finite"),
    ([10.0, 2.0, 5.0, 10.0], "x0 < x1 and y0 < y1"),
    ([0.1, 0.2, 0.5, 0.6], None),  # normalised corners are a (tiny) box inside the image: accepted
    ([10.0, 10.0, 90.0, 50.0], r"outside its 64x48 image.*not cxcywh, not normalised"),
    ([-5.0, 0.0, 20.0, 20.0], "outside its 64x48 image"),
])
def test_a_box_that_is_not_finite_or_leaves_its_image_is_refused_not_clamped(tokenizer, bbox, message):
    collator = RECCollator(tokenizer, image_size=32, max_text_tokens=8)
    record = grey_record(64, 48, bbox)
    if message is None:
        assert collator([record])["labels"].shape == (1, 4)
        return
    with pytest.raises(ValueError, match=message):
        collator([record])
    assert collator([grey_record(64, 48, [64.5, 47.9, 64.9, 48.4])])["labels"].shape == (1, 4)  # within 1 px
