"""examples/train_rec.py on real photographs in every real format: the commands of docs/real-data.md, trained a few
steps on tiny towers, every split evaluated (results.json's `splits`, results.md), the best adapter reloaded with
--eval_only (the same numbers, in one process and in two), predict.py on a photo; the data flags' checks; the
README's main job parsed as before.

The photographs are `peft_m2ist.data.sample_photos` (five scikit-image photos, splits train / val / testA / testB),
written in the refer, TransVG and Hub layouts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import test_train_script as script_tests
import torch
import yaml

from peft_m2ist import M2ISTConfig
from peft_m2ist.data import RecordError
from peft_m2ist.data.sample_photos import (
    HF_SPLIT_NAMES,
    SAMPLE_PHOTOS,
    sample_hf_dataset,
    write_refer_layout,
    write_transvg_layout,
)
from peft_m2ist.data.sources import STANDARD_EVAL_SPLITS, DataSource
from peft_m2ist.training import CONFIG_FLAGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_rec.py"
PAGE = ROOT / "docs" / "real-data.md"
pytestmark = pytest.mark.slow
towers = script_tests.towers  # the tiny local towers (a MobileNetV2 and a BERT saved as folders), once per module
train_rec = script_tests.train_rec  # examples/train_rec.py as a module, accelerate set up for one CPU process

EXPRESSIONS = {split: sum(len(o.phrases) for p in SAMPLE_PHOTOS if p.split == split for o in p.objects)
               for split in ("train", "val", "testA", "testB")}
HF_SPLITS = ",".join(f"{ours}={theirs}" for ours, theirs in HF_SPLIT_NAMES.items())


def page_commands() -> list[tuple[str, list[str], list[str]]]:
    """(mode, launcher words, the script's arguments) of every `<!-- train-command: MODE -->` block of the page."""
    found = []
    for match in re.finditer(r"<!-- train-command: (\w+) -->\n```bash\n(.*?)```", PAGE.read_text(), re.S):
        words = shlex.split(match.group(2).replace("\\\n", " "))
        at = words.index("examples/train_rec.py")
        found.append((match.group(1), words[:at], words[at + 1:]))
    return found


def page_command(mode: str) -> list[str]:
    """The script's arguments in the page's first command for `--dataset mode`."""
    return next(argv for found, _, argv in page_commands() if found == mode)


def tiny(towers, out: Path) -> list[str]:
    """Appended to a page command (later flags win): tiny towers and head, 128 px, 2 steps of batch 1."""
    vision, text = towers
    return ["--vision_model", str(vision), "--text_model", str(text), "--output_dir", str(out), "--image_size", "128",
            "--bottleneck_dim", "16", "--head_hidden_size", "32", "--head_num_hidden_layers", "1",
            "--head_num_attention_heads", "2", "--head_intermediate_size", "64", "--batch_size", "1",
            "--max_train_steps", "2", "--num_workers", "0", "--checkpointing_steps", "0", "--report_to", "none"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The sample photos as refer API files (refcoco, unc), TransVG split files (referit, with one row whose box is
    far outside its photo appended to val) and a Hub dataset saved with `save_to_disk`."""
    root = tmp_path_factory.mktemp("photos")
    write_refer_layout(root / "refer")
    write_transvg_layout(root / "transvg", "referit")
    val = root / "transvg" / "referit" / "referit_val.pth"
    torch.save([*torch.load(val), ("coins.jpg", "9.mat", [0.0, 0.0, 5000.0, 5000.0], "a box bigger than the photo")],
               val)
    sample_hf_dataset().save_to_disk(str(root / "hf"))
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread, as the torchrun processes (OMP_NUM_THREADS=1): the same float sums everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_results(out: Path, splits: list[str], skipped: dict[str, dict] | None = None) -> dict:
    """results.json's `splits` and results.md's table hold every split with its samples; returns the splits."""
    results = json.loads((out / "results.json").read_text())
    assert list(results["splits"]) == splits
    for split, scores in results["splits"].items():
        assert set(scores) == {"accuracy", "mean_iou", "num_samples"}  # no column for the phrase type `unknown`
        assert scores["num_samples"] == EXPRESSIONS[split] and 0 <= scores["accuracy"] <= 1
    reports = results["load_reports"]
    assert {split: report["skipped"] for split, report in reports.items() if report["skipped"]} == (skipped or {})
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| split | Acc@0.5 (%) | mean IoU | samples |") and rows[0].count("|") == 5
    assert rows[1:] == [f"| {split} | {100 * s['accuracy']:.2f} | {s['mean_iou']:.4f} | {s['num_samples']} |"
                        for split, s in results["splits"].items()]
    return results["splits"]


def test_refer_photos_train_evaluate_every_split_reload_in_one_and_two_processes_and_predict(
        towers, photos, train_rec, tmp_path, one_thread):
    out = tmp_path / "refer"
    refer = ["--data_root", str(photos / "refer"), "--image_dir", str(photos / "refer" / "images")]
    train_rec.main([*page_command("refer"), *refer, *tiny(towers, out)])
    splits = check_results(out, ["val", "testA", "testB"])  # RefCOCO unc's standard splits
    history = json.loads((out / "results.json").read_text())["history"]
    assert list(history[-1]["splits"]) == ["val", "testA", "testB"] and history[-1]["split"] == "val"

    evaluate = [*page_command("refer"), *refer, *tiny(towers, tmp_path / "unused"), "--eval_only", "--adapter",
                str(out / "best_adapter")]
    reloaded = train_rec.main([*evaluate, "--output_dir", str(tmp_path / "eval")])
    assert reloaded["splits"] == splits and check_results(tmp_path / "eval", list(splits)) == splits

    # two processes: each sample is its own batch (--batch_size 1) in both runs, so every float is the same
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(SCRIPT), *evaluate, "--output_dir", str(tmp_path / "eval2")],
                   capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, check=True)
    two = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert two["processes"] == 2 and two["splits"] == splits

    coins = next(p for p in SAMPLE_PHOTOS if p.name == "coins")
    prediction = tmp_path / "prediction.json"
    subprocess.run([sys.executable, str(ROOT / "examples" / "predict.py"), "--adapter", str(out / "best_adapter"),
                    "--image", str(photos / "refer" / "images" / coins.file_name), "--phrase",
                    coins.objects[0].phrases[0], "--output", str(tmp_path / "prediction.png"), "--output_json",
                    str(prediction)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
    [predicted] = json.loads(prediction.read_text())
    width, height = coins.image().size
    x0, y0, x1, y1 = predicted["box_xyxy_pixels"]
    assert predicted["image_size"] == [width, height] and 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    assert (tmp_path / "prediction.png").is_file()


@pytest.mark.parametrize("mode", ["transvg", "hf"])
def test_transvg_and_hub_photos_train_evaluate_every_split_and_reload(mode, towers, photos, train_rec, tmp_path,
                                                                      capsys):
    """TransVG's referit files (xyxy boxes; one bad row in val, skipped and reported) and a save_to_disk dataset
    (its own split names, mapped)."""
    sources = {
        "transvg": ["--data_root", str(photos / "transvg"), "--image_dir", str(photos / "transvg" / "images"),
                    "--on_bad_record", "skip"],
        "hf": ["--hf_path", str(photos / "hf"), "--hf_split_names", HF_SPLITS],
    }[mode]
    out = tmp_path / mode
    common = [*page_command(mode), *sources, "--eval_splits", "val,testA,testB"]
    train_rec.main([*common, *tiny(towers, out)])
    skipped = {"val": {"box_outside_image": 1}} if mode == "transvg" else None
    splits = check_results(out, ["val", "testA", "testB"], skipped)
    if skipped:
        assert "Skipped records (--on_bad_record skip): val: 1 {'box_outside_image': 1}" in capsys.readouterr().out
        assert "Skipped records" in (out / "results.md").read_text()
    workers = ["--num_workers", "1"] if mode == "hf" else []  # the same numbers with the images decoded in a worker
    reloaded = train_rec.main([*common, *tiny(towers, tmp_path / "eval"), *workers, "--eval_only", "--adapter",
                               str(out / "best_adapter")])
    assert reloaded["splits"] == splits


def test_a_bad_record_stops_the_run_by_default_naming_the_file_and_row(photos):
    source = DataSource.from_flags({"dataset": "transvg", "data_root": str(photos / "transvg"),
                                    "dataset_name": "referit", "image_dir": str(photos / "transvg" / "images")})
    with pytest.raises(RecordError, match=r"\[box_outside_image\] .*referit_val\.pth row #5"):
        source.load("val")


def usage_error(train_rec, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        train_rec.parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.replace("\n", " ")


def test_data_flags_are_checked_against_the_files_before_anything_loads(train_rec, photos, capsys, monkeypatch,
                                                                       tmp_path):
    from peft_m2ist import pretrained

    def no_towers(*args, **kwargs):
        raise AssertionError("a tower was loaded")

    monkeypatch.setattr(pretrained, "load_vision_tower", no_towers)
    monkeypatch.setattr(pretrained, "load_text_tower", no_towers)
    refer, transvg, hf = photos / "refer", photos / "transvg", photos / "hf"
    refcoco = ["--dataset", "refer", "--data_root", str(refer), "--dataset_name", "refcoco"]
    referit = ["--dataset", "transvg", "--data_root", str(transvg), "--dataset_name", "referit", "--image_dir",
               str(transvg / "images")]
    hub = ["--dataset", "hf", "--hf_path", str(hf), "--hf_split_names", HF_SPLITS, "--eval_splits", "val,testA"]
    refs = refer / "refcoco" / "refs(unc).p"
    cases = [
        (["--dataset", "refer", "--dataset_name", "refcoco"], "--dataset refer needs --data_root"),
        ([*refcoco[:4], "--dataset_name", "refcoco+", "--split_by", "google"],
         "--split_by google: refcoco+ has no google split (the refer API's files, --dataset_name: --split_by: "
         "refcoco: unc, google; refcoco+: unc; refcocog: umd, google)"),
        ([*refcoco[:4], "--dataset_name", "refcocog"], f"{refer / 'refcocog' / 'refs(umd).p'} not found"),
        ([*refcoco[:4], "--dataset_name", "refcoco4"], "--dataset_name refcoco4: --dataset refer reads refcoco, "),
        ([*refcoco, "--eval_splits", "val,testC"], f"--eval_splits testC: {refs} holds no ref of split 'testC'; its "
         "splits (refs each): testA (3), testB (3), train (7), val (3)"),
        ([*refcoco, "--eval_splits", "val,val"], "--eval_splits val,val: a split is named twice"),
        ([*refcoco, "--image_dir", str(refer / "missing")], f"--image_dir {refer / 'missing'}: no such folder"),
        ([*refcoco, "--hf_path", str(hf)], "--dataset refer reads no --hf_path (--hf_path is read by --dataset hf)"),
        ([*referit[:6]], "--dataset transvg needs --image_dir"),
        ([*referit, "--train_split", "trainval", "--eval_splits", "val"],
         f"--train_split trainval: no {transvg / 'referit' / 'referit_trainval.pth'}; the splits of the files in "
         f"{transvg / 'referit'}: testA, testB, train, val"),
        ([*referit], "--eval_splits test: no "),  # referit's standard splits are val,test
        ([*hub[:4]], f"--eval_splits val: {hf} has no split 'val'; its splits (rows each): test_a (3), test_b (3), "
         "train (7), validation (3)"),
        ([*hub, "--hf_columns", "bbox=box"], f"--hf_columns bbox=box: {hf} [train] has no column 'box'; its "
         "columns: ['image', 'bbox', 'sentences', 'file']"),
        ([*hub, "--hf_columns", "bbox=file"], "--hf_columns bbox=file: column of"),
        ([*hub, "--hf_columns", "sentences=bbox"], "not a string, a list of strings or a list of {'sent': string}"),
        ([*hub, "--hf_columns", "box"], "--hf_columns box: 'box' is not KEY=VALUE"),
        ([*hub, "--hf_columns", "boxes=bbox"], "--hf_columns boxes=bbox: unknown keys ['boxes']"),
        ([*hub, "--hf_box_format", "xyxy"], f"--hf_box_format xyxy: [degenerate_box] {hf} [train] row #2: box "),
        ([*hub, "--hf_name", "default"], f"--hf_name default: {hf} is a save_to_disk folder, which has no "),
        (["--dataset", "shapes", "--eval_splits", "testA"],
         "--eval_splits testA: the shapes benchmark has the splits train, val, test, test_heldout"),
        (["--num_workers", "-1"], "--num_workers -1: must be 0"),
    ]
    for argv, message in cases:
        assert message in usage_error(train_rec, argv, capsys), argv
    assert "it fits the image as xywh: pass --hf_box_format xywh" in usage_error(
        train_rec, [*hub, "--hf_box_format", "xyxy"], capsys)

    normalised = tmp_path / "hf_normalised"
    sample_hf_dataset().map(lambda row: {"bbox": [v / 1000 for v in row["bbox"]]}).save_to_disk(str(normalised))
    assert "they look normalised" in usage_error(train_rec, [*hub[:2], "--hf_path", str(normalised), *hub[4:]],
                                                 capsys)
    args = train_rec.parse_args([*refcoco, "--eval_only", "--adapter", "x", "--output_dir", str(tmp_path / "e")])
    assert (args.split_by, args.train_split, args.eval_splits, args.augment, args.image_size, args.cache_features) == (
        "unc", "train", ["val", "testA", "testB"], True, 640, False)
    args = train_rec.parse_args([*refcoco, "--no-augment"])
    assert (args.augment, args.cache_features) == (False, True)


def test_refer_files_with_a_pickled_split_are_read_without_running_code(photos, tmp_path):
    """The split check reads the refs pickle with the restricted unpickler, as the reader does."""
    root = tmp_path / "refer"
    write_refer_layout(root, photos=SAMPLE_PHOTOS[:2])
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([{"split": "train", "x": os.system}]))
    source = DataSource.from_flags({"dataset": "refer", "data_root": str(root), "dataset_name": "refcoco"})
    with pytest.raises(ValueError, match="system"):
        source.check({"--train_split": ["train"]})


# --------------------------------------------------------------------------------------------- the page, defaults
def test_the_pages_commands_parse_and_match_their_dataset_mode(train_rec):
    from accelerate.commands.launch import launch_command_parser

    commands = page_commands()
    assert sorted({mode for mode, _, _ in commands}) == ["hf", "refer", "transvg"]
    assert any("--multi_gpu" in launcher for _, launcher, _ in commands)
    for mode, launcher, argv in commands:
        assert launcher[:2] == ["accelerate", "launch"], launcher
        launch_command_parser().parse_args([*launcher[2:], "examples/train_rec.py"])  # accelerate's own flags
        args = train_rec.build_parser().parse_args(argv)  # every flag exists, every value in its choices
        assert args.dataset == mode and args.output_dir.startswith("outputs/")


def test_the_pages_split_table_is_the_codes():
    table = PAGE.read_text().split("<!-- standard-splits:begin", 1)[1].split("<!-- standard-splits:end", 1)[0]
    rows = {}
    for line in table.splitlines()[3:]:
        if line.startswith("|"):
            mode, name, split_by, splits = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows[(mode, name or None, split_by or None)] = tuple(splits.split(","))
    assert rows == STANDARD_EVAL_SPLITS


def test_adapter_flags_default_to_m2istconfig_and_default_yaml_sets_only_overrides(train_rec):
    parser = train_rec.build_parser()
    defaults = {action.dest: action.default for action in parser._actions}
    fields = {field.name: field.default for field in dataclasses.fields(M2ISTConfig)}
    assert len(CONFIG_FLAGS) == 17 and {name: defaults[name] for name in CONFIG_FLAGS} == {
        name: fields[name] for name in CONFIG_FLAGS}
    text = (ROOT / "examples" / "configs" / "default.yaml").read_text()
    values = yaml.safe_load(text)
    assert values and not [key for key, value in values.items() if value == defaults[key]]
    assert all("  # " in line for line in text.splitlines() if line and not line.startswith("#"))  # each says why


MAIN_JOB = {
    "vision_model": "offline:mobilenet_v2-stride16", "text_model": "offline:minilm-l6", "adapter": None,
    "num_tapped_layers": 6, "bottleneck_dim": 128, "expert_scale": 0.1, "interaction": "shared", "mixture": "sum",
    "head_hidden_size": 256, "head_num_hidden_layers": 2, "head_num_attention_heads": 8,
    "head_intermediate_size": 512, "head_dropout": 0.1, "head_attention_dropout": 0.0, "box_head": "pointer",
    "head_recompute_feed_forward": True, "head_gradient_checkpointing": False, "max_text_tokens": 20,
    "tower_dtype": "float32", "fold_frozen_batch_norms": True, "tower_micro_batch_size": None, "data_seed": 0,
    "image_size": 128, "train_samples": None, "eval_samples": None, "control": "none", "augment": False,
    "cache_dir": None, "cache_features": True, "seed": 13, "num_epochs": 7, "max_train_steps": None,
    "batch_size": 32, "gradient_accumulation_steps": 1, "lr_head": 0.0003, "lr_adapter": 0.0003,
    "weight_decay": 0.0001, "lr_scheduler": "cosine", "warmup_ratio": 0.05, "max_grad_norm": 1.0,
    "mixed_precision": None, "output_dir": "outputs/m2ist-shapes", "checkpointing_steps": 200,
    "checkpoints_total_limit": 2, "resume_from_checkpoint": None, "overwrite_output_dir": False,
    "eval_only": False, "report_to": "auto", "push_to_hub": False, "hub_model_id": None,
}
"""`parse_args(["--config", "examples/configs/default.yaml"])` before the real-data flags (commit c1025ed)."""


def test_the_readmes_main_job_trains_as_before(train_rec):
    args = vars(train_rec.parse_args(["--config", "examples/configs/default.yaml"]))
    assert {key: args[key] for key in MAIN_JOB} == MAIN_JOB
    assert {key: type(args[key]) for key in MAIN_JOB} == {key: type(value) for key, value in MAIN_JOB.items()}
    assert (args["dataset"], args["train_split"], args["eval_splits"], args["num_workers"]) == (
        "shapes", "train", ["val"], 0)


def test_refer_photos_without_augmentation_train_on_a_disk_cache_built_once_per_image(
        towers, photos, train_rec, tmp_path, one_thread):
    """--no-augment: the towers' outputs cached on disk, one vision row per photo and one text row per expression;
    the same scores as running the towers at every step; reused by a later run; built once for two processes, which
    then train and both re-evaluate the best adapter (the second process used to skip it and hang the first)."""
    refer = [*page_command("refer"), "--data_root", str(photos / "refer"), "--image_dir",
             str(photos / "refer" / "images"), "--no-augment"]
    cache = tmp_path / "cache"
    cached = train_rec.main([*refer, *tiny(towers, tmp_path / "cached"), "--feature_cache_dir", str(cache),
                             "--max_train_steps", "3"])
    manifest = json.loads((cache / "train" / "manifest.json").read_text())
    train_photos = [p for p in SAMPLE_PHOTOS if p.split == "train"]
    assert (manifest["num_images"], manifest["num_records"]) == (len(train_photos), EXPRESSIONS["train"])
    assert sorted(p.name for p in cache.iterdir()) == ["eval-testA", "eval-testB", "eval-val", "train"]

    direct = train_rec.main([*refer, *tiny(towers, tmp_path / "direct"), "--no-cache_features",
                             "--max_train_steps", "3"])
    assert cached["splits"] == direct["splits"] and cached["history"] == direct["history"]

    built = (cache / "train" / "manifest.json").stat().st_mtime_ns
    again = train_rec.main([*refer, *tiny(towers, tmp_path / "again"), "--feature_cache_dir", str(cache),
                            "--max_train_steps", "3"])
    assert (cache / "train" / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt
    assert again["splits"] == cached["splits"]

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), *refer, *tiny(towers, tmp_path / "two"), "--feature_cache_dir",
                          str(tmp_path / "cache2"), "--max_train_steps", "3"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "Error" in line)
    assert sorted(p.name for p in (tmp_path / "cache2").iterdir()) == ["eval-testA", "eval-testB", "eval-val", "train"]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert list(results["splits"]) == ["val", "testA", "testB"] and results["best"]
