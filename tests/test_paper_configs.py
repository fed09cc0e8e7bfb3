"""examples/configs/paper_*.yaml: the authors' setting per dataset; their model keys build the preset's M2ISTConfig on
tiny towers of the paper's families (DETR + BERT)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftConfig, get_peft_model
from test_fidelity import tiny_bert, tiny_detr

from peft_m2ist import M2ISTConfig, VisionTextPair
from peft_m2ist.tuner.config import PAPER_PRESET

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"refcoco": (20, 90, 60), "refcoco+": (20, 180, 120), "refcocog": (40, 90, 60), "referit": (20, 90, 60)}
MODEL_KEYS = {f.name for f in dataclasses.fields(M2ISTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / "configs" / f"paper_{name}.yaml").read_text())


def _script_flags() -> set[str]:
    spec = importlib.util.spec_from_file_location("train_rec_flags", ROOT / "examples" / "train_rec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {a.dest for a in module.build_parser()._actions}


def test_every_dataset_has_a_paper_config():
    assert sorted(p.name for p in (ROOT / "examples" / "configs").glob("paper_*.yaml")) == sorted(
        f"paper_{name}.yaml" for name in CONFIGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paper_config_is_the_authors_setting(name):
    values = _load(name)
    tokens, epochs, drop = CONFIGS[name]
    assert set(values) <= _script_flags(), set(values) - _script_flags()
    assert values["preset"] == "paper"
    assert (values["vision_model"], values["text_model"]) == ("facebook/detr-resnet-50", "bert-base-uncased")
    assert (values["image_size"], values["max_text_tokens"]) == (640, tokens)
    assert (values["lr_head"], values["lr_adapter"], values["weight_decay"]) == (1e-4, 1e-5, 1e-4)
    assert (values["lr_scheduler"], values["num_epochs"], values["lr_drop_epoch"]) == ("step", epochs, drop)
    assert (values["batch_size"], values["seed"], values["max_grad_norm"], values["warmup_ratio"]) == (64, 13, 0, 0)
    assert values["dataset"] == ("transvg" if name == "referit" else "refer")
    assert values["dataset_name"] == name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paper_config_builds_the_preset_on_tiny_detr_and_bert(name):
    values = _load(name)
    model_keys = {k: v for k, v in values.items() if k in MODEL_KEYS}
    assert {"preset", "image_size", "max_text_tokens", "box_head"} <= set(model_keys)
    config = M2ISTConfig(**model_keys)
    for key, value in PAPER_PRESET.items():
        assert getattr(config, key) == value, key
    torch.manual_seed(0)
    model = get_peft_model(VisionTextPair(tiny_detr(), tiny_bert()).eval(), config)
    built = model.peft_config["default"]
    assert built.tower_shapes["vision"]["num_tokens"] == (640 // 32) ** 2
    # the first blocks: as many as the tiny DETR has (2 of the tiny BERT's 3)
    assert built.text_layers == [f"encoder.layer.{i}.output.dense" for i in range(2)]
    head = model.base_model.m2ist_head["default"]
    assert head.position_embedding.shape[1] == 1 + values["max_text_tokens"] + 400


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The sample photographs in the refer layout (refcoco, refcoco+, refcocog) and as TransVG's referit files."""
    from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS, write_refer_layout, write_transvg_layout

    root = tmp_path_factory.mktemp("paper_layouts")
    photos = [p if p.split != "testB" else dataclasses.replace(p, split="test") for p in SAMPLE_PHOTOS]
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc")):
        write_refer_layout(root / "refer", dataset, split_by)
    write_refer_layout(root / "refer", "refcocog", "umd", photos)
    write_transvg_layout(root / "transvg", "referit", photos)
    return root


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_rec_reads_every_key_and_builds_the_step_schedule(name, layouts):
    spec = importlib.util.spec_from_file_location("train_rec_paper", ROOT / "examples" / "train_rec.py")
    train_rec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_rec)
    kind = "transvg" if name == "referit" else "refer"
    args = train_rec.parse_args(["--config", str(ROOT / "examples" / "configs" / f"paper_{name}.yaml"),
                                 "--data_root", str(layouts / kind), "--image_dir", str(layouts / kind / "images")])
    values = _load(name)
    assert (args.preset, args.dataset, args.dataset_name) == ("paper", values["dataset"], name)
    assert args.eval_splits == values["eval_splits"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train_rec.training.build_scheduler(args, optimizer, total_steps=values["num_epochs"] * 3,
                                                   steps_per_epoch=3)
    rates = []
    for _ in range(values["num_epochs"] * 3):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    drop = values["lr_drop_epoch"] * 3
    assert rates[drop - 1] == 1.0 and rates[drop] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.1)
