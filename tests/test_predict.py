"""examples/predict.py on tiny towers saved to tmp_path: tower choice, image checks, EXIF, clamping, JSON output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from hub_stand_in import LocalHub
from PIL import Image
from tiny_adapter import save_tiny_adapter

from peft_m2ist import M2ISTConfig
from peft_m2ist.pretrained import DEFAULT_TEXT_TOWER, MOBILENET_V2_STRIDE16_TOWER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predict_script():
    """examples/predict.py as a module."""
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "examples" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """The tiny towers and adapter of tests/helpers/tiny_adapter.py, and a second, wider vision tower that the adapter does
    not fit."""
    root = tmp_path_factory.mktemp("predict")
    built = save_tiny_adapter(root)
    wide = tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.5, image_size=32))
    wide.save_pretrained(root / "wide_vision")
    tf.MobileNetV2ImageProcessor().save_pretrained(root / "wide_vision")
    return SimpleNamespace(root=root, vision=built.vision, wide=root / "wide_vision", text=built.text,
                           adapter=built.adapter)


def _image(path: Path, size: tuple[int, int] = (60, 20), orientation: int | None = None) -> Path:
    image = Image.new("RGB", size, (200, 40, 40))
    image.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


RECORD = {"vision": "/v", "text": "/t", "dtype": "bfloat16"}


def _empty_adapter(tmp_path: Path, record: dict | None = RECORD, towers_json: str | None = None,
                   name: str = "adapter") -> Path:
    """An adapter folder holding only its adapter_config.json, with the towers `record` (`None`: saved before the
    record existed) and, if given, the text of an older adapter's towers.json."""
    adapter = tmp_path / name
    adapter.mkdir()
    config = M2ISTConfig(base_towers=record).to_dict()
    if record is None:
        del config["base_towers"]
    (adapter / "adapter_config.json").write_text(json.dumps(config, default=str))
    if towers_json is not None:
        (adapter / "towers.json").write_text(towers_json)
    return adapter


# ------------------------------------------------------------------------------------------------ tower choice


def test_without_a_record_the_flags_are_asked_for_and_no_default_towers_used(predict_script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_script.parse_args(["--adapter", str(_empty_adapter(tmp_path, None)), "--val_samples", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not record its vision and text tower" in err
    assert "--vision_model" in err and "--text_model" in err
    assert MOBILENET_V2_STRIDE16_TOWER not in err and DEFAULT_TEXT_TOWER not in err


def test_flags_win_over_the_record_one_by_one(predict_script, tmp_path):
    adapter = _empty_adapter(tmp_path)
    args = predict_script.parse_args(["--adapter", str(adapter), "--val_samples", "1"])
    assert (args.vision_model, args.text_model, args.tower_dtype) == ("/v", "/t", "bfloat16")
    assert "adapter_config.json" in predict_script.describe_towers(args)
    args = predict_script.parse_args(["--adapter", str(adapter), "--val_samples", "1", "--text_model", "/mine"])
    assert (args.vision_model, args.text_model, args.tower_dtype) == ("/v", "/mine", "bfloat16")
    assert "--text_model" in predict_script.describe_towers(args)


def test_an_older_adapters_towers_json_is_read(predict_script, tmp_path, capsys):
    adapter = _empty_adapter(tmp_path, None, json.dumps({"vision": "/old_v", "text": "/old_t", "dtype": "float16"}))
    args = predict_script.parse_args(["--adapter", str(adapter), "--val_samples", "1"])
    assert (args.vision_model, args.text_model, args.tower_dtype) == ("/old_v", "/old_t", "float16")
    assert "towers.json" in predict_script.describe_towers(args)
    broken = _empty_adapter(tmp_path, None, "{not json", name="broken")
    with pytest.raises(SystemExit) as exit_info:
        predict_script.parse_args(["--adapter", str(broken), "--val_samples", "1"])
    assert exit_info.value.code == 2 and "towers.json" in capsys.readouterr().err


def test_a_hub_adapters_record_is_downloaded(predict_script, tmp_path, monkeypatch, capsys):
    hub = LocalHub(tmp_path / "hub").install(monkeypatch)
    from huggingface_hub import HfApi

    for repo, folder in (("org/m2ist-adapter", _empty_adapter(tmp_path, {"vision": "org/vision", "text": "org/text",
                                                                          "dtype": "float16"}, name="new")),
                         ("org/old-adapter", _empty_adapter(tmp_path, None, json.dumps(
                             {"vision": "org/old-vision", "text": "org/old-text", "dtype": "float32"}), name="old")),
                         ("org/bare-adapter", _empty_adapter(tmp_path, None, name="bare"))):
        HfApi().create_repo(repo)
        HfApi().upload_folder(repo_id=repo, folder_path=folder)
    assert set(hub.files("org/old-adapter")) == {"adapter_config.json", "towers.json"}
    args = predict_script.parse_args(["--adapter", "org/m2ist-adapter", "--val_samples", "1"])
    assert (args.vision_model, args.text_model, args.tower_dtype) == ("org/vision", "org/text", "float16")
    args = predict_script.parse_args(["--adapter", "org/old-adapter", "--val_samples", "1"])
    assert (args.vision_model, args.text_model, args.tower_dtype) == ("org/old-vision", "org/old-text", "float32")
    with pytest.raises(SystemExit):  # neither a record nor towers.json: the flags, not default towers
        predict_script.parse_args(["--adapter", "org/bare-adapter", "--val_samples", "1"])
    assert "--vision_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no such repository on the (stand-in) Hub
        predict_script.parse_args(["--adapter", "org/nothing-here", "--val_samples", "1"])
    assert "adapter_config.json" in capsys.readouterr().err


def test_an_adapter_that_does_not_fit_the_towers_names_them_and_the_flags(predict_script, tiny):
    args = predict_script.parse_args(["--adapter", str(tiny.adapter), "--val_samples", "1",
                                      "--vision_model", str(tiny.wide), "--text_model", str(tiny.text)])
    with pytest.raises(ValueError, match="does not fit") as err:
        predict_script.load_model(args)
    message = str(err.value)
    assert "--vision_model" in message and "--text_model" in message
    assert str(tiny.wide) in message and str(tiny.text) in message


# ------------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("value", ["-2", "0", "two"])
def test_val_samples_must_be_a_positive_integer(predict_script, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        predict_script.parse_args(["--adapter", str(tmp_path), "--val_samples", value])
    assert exit_info.value.code == 2 and "--val_samples" in capsys.readouterr().err


def test_val_samples_and_images_together_are_an_error(predict_script, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        predict_script.parse_args(["--adapter", str(tmp_path), "--val_samples", "2", "--image", str(image),
                                   "--phrase", "the blue square"])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "folder", "not_an_image", "truncated"])
def test_an_image_that_cannot_be_read_is_an_argparse_error_naming_it(predict_script, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "not_an_image":
        path.write_text("hello")
    elif kind == "truncated":
        _image(tmp_path / "whole.png", (64, 64))
        path.write_bytes((tmp_path / "whole.png").read_bytes()[:80])
    with pytest.raises(SystemExit) as exit_info:
        predict_script.parse_args(["--adapter", str(_empty_adapter(tmp_path)), "--image", str(path),
                                   "--phrase", "the thing"])
    assert exit_info.value.code == 2 and f"--image {path}" in capsys.readouterr().err


def test_device_flag(predict_script, tmp_path, capsys):
    adapter = str(_empty_adapter(tmp_path))
    assert predict_script.parse_args(["--adapter", adapter, "--val_samples", "1", "--device", "cpu"]).device == \
        torch.device("cpu")
    default = predict_script.parse_args(["--adapter", adapter, "--val_samples", "1"]).device
    assert default == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bad = ["nonsense"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit):
            predict_script.parse_args(["--adapter", adapter, "--val_samples", "1", "--device", device])
        assert f"--device {device}" in capsys.readouterr().err.replace("'", "")


# ------------------------------------------------------------------------------------------------ images and boxes


def test_images_are_seen_upright_as_displayed(predict_script, tmp_path):
    # stored 60 x 20 with EXIF orientation 6 (rotate 90 degrees clockwise to display): displayed 20 x 60
    path = _image(tmp_path / "phone.jpg", (60, 20), orientation=6)
    args = predict_script.parse_args(["--adapter", str(_empty_adapter(tmp_path)), "--image", str(path),
                                      "--phrase", "the blue square"])
    (row,) = predict_script.records(args)
    assert row["image"].size == (20, 60) and row["image"].mode == "RGB"
    # the blue quarter is top-left as stored, so top-right as displayed
    assert row["image"].getpixel((15, 5))[2] > 150 and row["image"].getpixel((5, 5))[2] < 100


def test_end_to_end_writes_png_and_json_with_boxes_in_the_displayed_image(predict_script, tiny, tmp_path, capsys):
    wide = _image(tmp_path / "wide.png", (90, 30))
    phone = _image(tmp_path / "phone.jpg", (60, 20), orientation=8)
    png, out_json = tmp_path / "out" / "grid.png", tmp_path / "out" / "boxes.json"
    predict_script.main(["--adapter", str(tiny.adapter), "--vision_model", str(tiny.vision), "--text_model",
                         str(tiny.text), "--device", "cpu", "--image", str(wide), str(phone), "--phrase",
                         "the blue square", "the red part", "--output", str(png), "--output_json", str(out_json)])
    captured = capsys.readouterr()
    assert "--vision_model" in captured.err and str(tiny.vision) in captured.err  # the towers used are logged
    assert captured.out.count("box [x0, y0, x1, y1]") == 2
    entries = json.loads(out_json.read_text())
    assert [(e["image"], e["phrase"], e["image_size"]) for e in entries] == [
        (str(wide), "the blue square", [90, 30]), (str(phone), "the red part", [20, 60])]
    for entry in entries:
        x0, y0, x1, y1 = entry["box_xyxy_pixels"]
        width, height = entry["image_size"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["boxes.json", "grid.png"]  # no temp file left
    with Image.open(png) as grid:
        assert grid.size == (2 * 256, 284)


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(predict_script, tmp_path):
    target = tmp_path / "boxes.json"
    predict_script.write_json_atomic(target, [{"phrase": "a"}])
    with pytest.raises(TypeError):
        predict_script.write_json_atomic(target, [{"phrase": object()}])
    assert json.loads(target.read_text()) == [{"phrase": "a"}]
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.json"]


@pytest.mark.parametrize("phrase", ["", "   "])
def test_an_empty_phrase_is_an_argparse_error(predict_script, tmp_path, capsys, phrase):
    image = _image(tmp_path / "img.png")
    with pytest.raises(SystemExit) as exit_info:
        predict_script.parse_args(["--adapter", str(_empty_adapter(tmp_path)), "--image", str(image), "--phrase",
                                   phrase])
    assert exit_info.value.code == 2 and "the phrase is empty" in capsys.readouterr().err


def test_an_image_too_thin_for_the_canvas_is_named_not_a_traceback(predict_script, tiny, tmp_path):
    thin = _image(tmp_path / "thin.png", (20000, 20))
    out_json = tmp_path / "boxes.json"
    with pytest.raises(SystemExit, match=r"20000x20 pixels.*short side would be under one pixel"):
        predict_script.main(["--adapter", str(tiny.adapter), "--vision_model", str(tiny.vision), "--text_model",
                             str(tiny.text), "--device", "cpu", "--image", str(thin), "--phrase", "the red part",
                             "--output_json", str(out_json)])
