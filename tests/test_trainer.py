"""transformers' Trainer with its default TrainingArguments: train, evaluate (with eval_loss), save_model + reload."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tiny_towers import batch, build_pair, tiny_config
from transformers import Trainer, TrainingArguments
from transformers.utils import find_labels

from peft_m2ist import VisionTextPair

PAIRS = ["vit+bert", "clip"]


def _dataset(size: int, seed: int) -> Dataset:
    features = batch(size=size, seed=seed)
    return Dataset.from_dict({k: v.tolist() for k, v in features.items()})


@pytest.mark.parametrize("pair_name", PAIRS)
def test_trainer_defaults_train_evaluate_save_and_reload(tmp_path, pair_name):
    torch.manual_seed(0)
    model = get_peft_model(build_pair(pair_name), tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", max_steps=2,
                             per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(4, seed=1), eval_dataset=_dataset(3, seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items() if ".m2ist_" in k}

    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # the side network and head trained

    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    assert trainer.label_names == ["labels"]

    trainer.save_model(str(tmp_path / "saved"))
    inputs = batch(size=3, seed=5, labels=False)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).pred_boxes
        reloaded = PeftModel.from_pretrained(build_pair(pair_name), tmp_path / "saved")
        assert torch.equal(reloaded(**inputs).pred_boxes, expected)


@pytest.mark.parametrize("pair_name", PAIRS)
def test_what_the_trainer_reads_from_the_container(pair_name):
    container = build_pair(pair_name)
    original_class = type(container)
    model = get_peft_model(container, tiny_config())
    base = model.get_base_model()
    assert base is container
    params = inspect.signature(base.forward).parameters
    assert {"pixel_values", "input_ids", "attention_mask", "pixel_mask", "labels"} <= set(params)
    assert find_labels(type(base)) == ["labels"]
    assert base.accepts_loss_kwargs is False
    assert type(base).__name__ == original_class.__name__ and isinstance(base, original_class)
    assert model.unload() is container and type(container) is original_class


def test_a_wrapped_clip_container_still_runs_as_itself():
    clip = build_pair("clip")
    inputs = batch(labels=False)
    with torch.no_grad():
        expected = clip(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits_per_image
    model = get_peft_model(clip, tiny_config())
    with torch.no_grad(), model.disable_adapter():
        got = clip(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits_per_image
    assert torch.equal(got, expected)
    copied = pickle.loads(pickle.dumps(model.unload()))
    assert type(copied).__name__ == "CLIPModel"


def test_a_vision_text_pair_is_not_callable_on_its_own():
    with pytest.raises(TypeError, match="no forward of its own"):
        VisionTextPair(torch.nn.Identity(), torch.nn.Identity())(**batch())


def test_trainer_with_records_and_the_rec_collator(tmp_path):
    """Records (PIL image, xyxy box, phrase) batched by RECCollator. Their keys are not model arguments, and the
    Trainer strips each record to the model's arguments *before* the collator sees it, so this route needs
    `remove_unused_columns=False` (as any transformers dataset whose collator builds the inputs); everything else
    stays at its default (label names, loss)."""
    import numpy as np
    import transformers as tf
    from PIL import Image
    from tiny_towers import SMALL, mobilenet_v2

    from peft_m2ist.data import RECCollator
    from peft_m2ist.pretrained import minilm_path

    torch.manual_seed(0)
    pair = VisionTextPair(mobilenet_v2().eval(), tf.BertModel(tf.BertConfig(**SMALL)).eval())  # MiniLM's vocab
    model = get_peft_model(pair, tiny_config())
    rng = np.random.default_rng(0)
    records = [{"image": Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
                "bbox": [4.0 + i, 6.0, 30.0, 28.0 + i], "phrase": f"the red square number {i}",
                "phrase_type": "shape"} for i in range(4)]
    collator = RECCollator(tf.AutoTokenizer.from_pretrained(minilm_path()), image_size=32, max_text_tokens=6)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=2, per_device_train_batch_size=2,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=records, eval_dataset=records[:3],
                      data_collator=collator)
    assert trainer.train().global_step == 2
    assert trainer.evaluate()["eval_loss"] > 0
