"""The tensor rendering of the training augmentation against the PIL one it replaces (issue #29 item 5).

``RECCollator`` draws ``TrainAugment``'s decisions with ``TrainAugment.plan`` and renders them on tensors
(``peft_m2ist.data.tensor_augment``); ``benchmarks/loader_reference.PILRECCollator`` is the collator as it was (PIL
augmentation, numpy normalisation, ``torch.stack``). Pinned here, on the real sample photographs:

- boxes, phrases (flips), placements, masks and tokens: identical for a fixed seed;
- the unaugmented path (``train=False``, the README main job's): bit-identical batches;
- the colour jitter: bit-identical to PIL's ``ImageEnhance`` for the same input pixels;
- the pixels of augmented batches: equal but for the resize. torch's antialiased ``uint8`` bilinear resize and PIL's
  ``Image.resize(BILINEAR)`` round their fixed-point filters differently, by at most 1 grey level on a small share of
  pixels (checked without jitter below); the jitter (up to three factors <= 1.4, each truncating) can widen a 1-level
  difference to a few levels, so the bound is 8 levels for any value, with at most 1% of values differing by more
  than half a level, a mean absolute difference under 0.02 levels, and each image's per-channel mean and standard
  deviation within 0.05 levels (of 255). Measured: mean absolute difference under 0.002 levels, under 0.2% of the
  values differ, at most 4 levels, per-channel statistics within 0.001 levels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader
from transformers import BertTokenizerFast
from transformers.utils.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from benchmarks.loader_reference import PILRECCollator
from peft_m2ist.data import RECCollator, TrainAugment
from peft_m2ist.data import tensor_augment as ta
from peft_m2ist.data.canvas import CanvasBatch
from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS
from peft_m2ist.data.transforms import draw_jitter

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "left", "right", "on", "cup", "man"]
STD = torch.tensor(IMAGENET_DEFAULT_STD).reshape(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).reshape(1, 3, 1, 1)
PIL_ENHANCERS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                 "saturation": ImageEnhance.Color}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def records():
    """Every expression of the sample photos (29 records, 5 photos of 303 to 640 px, left/right phrases)."""
    images = {photo.name: photo.image() for photo in SAMPLE_PHOTOS}
    return [{"image": images[photo.name], "bbox": obj.box, "phrase": phrase, "phrase_type": photo.split}
            for photo in SAMPLE_PHOTOS for obj in photo.objects for phrase in obj.phrases]


def levels(batch: dict) -> torch.Tensor:
    """The batch's pixels back in grey levels (0..255)."""
    return (batch["pixel_values"] * STD + MEAN) * 255


def test_the_plan_draws_what_the_pil_augment_draws(records):
    augment = TrainAugment(640)
    flips = crops = 0
    for seed in range(12):
        for record in records:
            pil_rng, plan_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            sample = augment(record["image"], record["bbox"], record["phrase"], pil_rng)
            plan = augment.plan(*record["image"].size, record["bbox"], record["phrase"], plan_rng)
            assert (plan.bbox, plan.phrase, plan.offset, plan.size) == (sample.bbox, sample.phrase, sample.offset,
                                                                        sample.image.size)
            assert pil_rng.random() == plan_rng.random()  # the same number of draws
            flips += plan.flip and plan.phrase != record["phrase"]
            crops += plan.crop != (0, 0, *record["image"].size)
    assert flips > 0 and crops > 0  # both a flip that swapped words and a crop happened


@pytest.mark.parametrize("seed", range(4))
def test_augmented_batches_match_the_pil_loader(tokenizer, records, seed):
    before = PILRECCollator(tokenizer, image_size=640, train=True, seed=seed)(records)
    after = RECCollator(tokenizer, image_size=640, train=True, seed=seed)(records)
    for key in ("labels", "pixel_mask", "input_ids", "attention_mask"):
        assert torch.equal(before[key], after[key]), key
    assert before["phrase_type"] == after["phrase_type"]
    assert after["pixel_values"].shape == before["pixel_values"].shape == (len(records), 3, 640, 640)
    assert torch.equal(after["pixel_values"][after["pixel_mask"].unsqueeze(1).expand(-1, 3, -1, -1) == 0],
                       torch.zeros(int((after["pixel_mask"] == 0).sum()) * 3))  # padding stays 0
    old, new = levels(before), levels(after)
    for i, mask in enumerate(before["pixel_mask"].bool()):
        a, b = old[i][:, mask], new[i][:, mask]
        difference = (a - b).abs()
        assert difference.max() <= 8.0
        assert difference.mean() < 0.02
        assert (difference > 0.5).float().mean() < 0.01
        assert torch.allclose(a.mean(1), b.mean(1), atol=0.05) and torch.allclose(a.std(1), b.std(1), atol=0.05)


def test_without_jitter_the_pixels_differ_by_the_resize_only(records):
    augment = TrainAugment(640, jitter_p=0.0)
    differing = total = 0
    for seed, record in enumerate(records):
        sample = augment(record["image"], record["bbox"], record["phrase"], np.random.default_rng(seed))
        plan = augment.plan(*record["image"].size, record["bbox"], record["phrase"], np.random.default_rng(seed))
        pil = torch.from_numpy(np.asarray(sample.image, dtype=np.float32)).permute(2, 0, 1)
        difference = (ta.render(record["image"], plan) - pil).abs()
        assert difference.max() <= 1.0
        differing, total = differing + int((difference > 0).sum()), total + difference.numel()
    assert differing / total < 0.01


def test_the_jitter_is_pils_bit_for_bit(records):
    rng = np.random.default_rng(0)
    image = records[0]["image"].resize((301, 203))
    for trial in range(24):
        steps = draw_jitter(rng, 0.4, 0.4, 0.4)
        if trial % 4 == 0:  # factors far outside [0.6, 1.4] too: PIL's extrapolating, clipping branch
            steps = tuple((name, 3.0 * factor) for name, factor in steps)
        expected = image
        for name, factor in steps:
            expected = PIL_ENHANCERS[name](expected).enhance(factor)
        planes = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().contiguous()
        for name, factor in steps:
            planes = ta.JITTERS[name](planes, factor)
        assert np.array_equal(planes.permute(1, 2, 0).numpy(), np.asarray(expected, dtype=np.float32)), steps


@pytest.mark.parametrize("mean, std", [(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                                       ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_the_normalisation_gives_numpys_bits_for_every_level(mean, std):
    values = np.tile(np.arange(256, dtype=np.float32)[:, None], (5, 3)).reshape(-1, 1, 3)  # every level, odd length
    # the old collator's arithmetic: float32 levels / 255, minus the float32 mean, over the float32 std
    expected = (values / 255.0 - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    canvas = CanvasBatch(1, values.shape[0], mean, std)
    canvas.paste(0, torch.from_numpy(values.copy()).permute(2, 0, 1).contiguous(), (0, 0))
    assert np.array_equal(canvas.pixel_values[0, :, :, 0].T.numpy(), expected[:, 0])
    assert canvas.pixel_mask[0, :, 0].all() and not canvas.pixel_mask[0, :, 1:].any()
    with pytest.raises(ValueError, match="does not fit"):
        canvas.paste(0, torch.zeros(3, 2, 2), (values.shape[0] - 1, 0))


def test_unaugmented_batches_are_bit_identical(tokenizer, records):
    odd = [{"image": Image.new("L", (37, 91), 77), "bbox": [3, 4, 20, 60], "phrase": "the man on the left"},
           {"image": records[3]["image"].convert("RGBA"), "bbox": [0, 0, 10, 10], "phrase": "cup"}]
    for size in (640, 128):
        for batch in (records, odd, [{k: v for k, v in r.items() if k != "bbox"} for r in records[:5]]):
            before = PILRECCollator(tokenizer, image_size=size)(batch)
            after = RECCollator(tokenizer, image_size=size)(batch)
            assert before.keys() == after.keys()
            for key, value in before.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == after[key].dtype and value.stride() == after[key].stride(), key
                    assert torch.equal(value, after[key]), key
                else:
                    assert value == after[key], key


def test_worker_batches_come_in_shared_memory_with_zero_padding(tokenizer, records):
    collator = RECCollator(tokenizer, image_size=256)
    in_process = collator(records[:6])
    loader = DataLoader(records[:6], batch_size=6, num_workers=1, collate_fn=collator)
    from_worker = next(iter(loader))
    assert from_worker["pixel_values"].is_shared() and from_worker["pixel_mask"].is_shared()
    for key in ("pixel_values", "pixel_mask", "labels", "input_ids"):
        assert torch.equal(in_process[key], from_worker[key]), key


def test_a_plan_for_another_image_size_is_refused(records):
    plan = TrainAugment(64).plan(100, 80, (0, 0, 10, 10), "cup", np.random.default_rng(0))
    with pytest.raises(ValueError, match="drawn for a"):
        ta.render(records[0]["image"], plan)
