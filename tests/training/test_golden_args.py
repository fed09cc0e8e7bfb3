"""examples/train_rec.py's parsed flags are those recorded in `golden_args.json`, input by input.

The inputs: no flag at all, every YAML in examples/configs (the paper configs with their data paths pointed at the
sample photographs' layouts), and command lines from the tests and docs/real-data.md. `golden_args.json` was written
by the parser of the time (`python tests/training/test_golden_args.py --write`, from the repository root); a new
parser must give the same namespaces, value for value and type for type.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_args.json")
DATA = "<DATA>"
"""What the temporary folder of the sample layouts reads as in the golden file."""


def cases(data: Path) -> dict[str, tuple[str, list[str]]]:
    """Name -> (how to parse: `parse_args` with its checks, or `raw`: the parser alone, argv)."""
    refer, transvg, hf = data / "refer", data / "transvg", data / "hf"
    configs = ROOT / "examples" / "configs"
    refcoco = ["--dataset", "refer", "--data_root", str(refer), "--dataset_name", "refcoco"]
    referit = ["--dataset", "transvg", "--data_root", str(transvg), "--dataset_name", "referit", "--image_dir",
               str(transvg / "images")]
    hub = ["--dataset", "hf", "--hf_path", str(hf), "--hf_split_names",
           "train=train,val=validation,testA=test_a,testB=test_b", "--eval_splits", "val,testA"]
    found: dict[str, tuple[str, list[str]]] = {"no flags": ("parse_args", [])}
    for path in sorted(configs.glob("*.yaml")):
        argv = ["--config", f"examples/configs/{path.name}"]
        if path.name.startswith("paper_"):
            kind = "transvg" if path.name == "paper_referit.yaml" else "refer"
            argv += ["--data_root", str(data / kind), "--image_dir", str(data / kind / "images")]
        found[path.name] = ("parse_args", argv)
    found.update({
        "default.yaml, command line wins": ("parse_args", ["--config", "examples/configs/default.yaml", "--num_epochs",
                                                           "3", "--lr_head", "1e-4", "--no-fold_frozen_batch_norms"]),
        "augment": ("parse_args", ["--augment"]),
        "no-augment": ("parse_args", ["--no-augment"]),
        "no-cache_features": ("parse_args", ["--no-cache_features"]),
        "augment no-cache_features": ("parse_args", ["--augment", "--no-cache_features"]),
        "choices": ("parse_args", ["--tower_dtype", "bfloat16", "--mixed_precision", "no", "--control", "text_hidden",
                                   "--box_head", "mlp", "--on_nonfinite", "skip", "--interaction", "cross_attention"]),
        "int8 towers": ("parse_args", ["--tower_dtype", "int8"]),
        "adapter flags": ("parse_args", ["--preset", "paper", "--head_gradient_checkpointing",
                                         "--no-head_recompute_feed_forward", "--tower_micro_batch_size", "4",
                                         "--bottleneck_dim", "8", "--expert_scale", "0.5", "--max_text_tokens", "40"]),
        "step schedule": ("parse_args", ["--lr_scheduler", "step", "--lr_drop_epoch", "3", "--warmup_ratio", "0",
                                         "--max_train_steps", "10", "--gradient_accumulation_steps", "2"]),
        "output flags": ("parse_args", ["--output_dir", "outputs/x", "--checkpointing_steps", "0",
                                        "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
                                        "--report_to", "none", "--push_to_hub", "--hub_model_id", "org/m2ist"]),
        "overwrite": ("parse_args", ["--overwrite_output_dir", "--seed", "1", "--batch_size", "8"]),
        "shapes data": ("parse_args", ["--dataset", "shapes", "--data_seed", "3", "--image_size", "64",
                                       "--train_samples", "48", "--eval_samples", "24", "--eval_splits",
                                       "val,test_heldout", "--train_split", "test", "--cache_dir", "cache",
                                       "--feature_cache_dir", "features", "--num_workers", "2",
                                       "--on_bad_record", "skip"]),
        "refcoco eval_only": ("parse_args", [*refcoco, "--eval_only", "--adapter", "x", "--output_dir",
                                             str(data / "e")]),
        "refcoco no-augment": ("parse_args", [*refcoco, "--no-augment"]),
        "referit": ("parse_args", [*referit, "--eval_splits", "val,testA"]),
        "hub": ("parse_args", [*hub, "--hf_columns", "image=image,bbox=bbox,sentences=sentences",
                               "--hf_box_format", "xywh"]),
        "hub defaults": ("parse_args", hub),
    })
    for number, (mode, argv) in enumerate(page_commands()):
        found[f"docs/real-data.md #{number} ({mode})"] = ("raw", argv)
    return found


def page_commands() -> list[tuple[str, list[str]]]:
    """(mode, the script's arguments) of every `<!-- train-command: MODE -->` block of docs/real-data.md."""
    import re
    import shlex

    page = (ROOT / "docs" / "real-data.md").read_text()
    found = []
    for match in re.finditer(r"<!-- train-command: (\w+) -->\n```bash\n(.*?)```", page, re.S):
        words = shlex.split(match.group(2).replace("\\\n", " "))
        found.append((match.group(1), words[words.index("examples/train_rec.py") + 1:]))
    return found


def write_layouts(data: Path) -> None:
    """The sample photographs in every layout the cases read."""
    from peft_m2ist.data.sample_photos import (
        SAMPLE_PHOTOS,
        sample_hf_dataset,
        write_refer_layout,
        write_transvg_layout,
    )

    photos = [p if p.split != "testB" else dataclasses.replace(p, split="test") for p in SAMPLE_PHOTOS]
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc")):
        write_refer_layout(data / "refer", dataset, split_by)
    write_refer_layout(data / "refer", "refcocog", "umd", photos)
    write_transvg_layout(data / "transvg", "referit", photos)
    write_transvg_layout(data / "transvg", "referit", SAMPLE_PHOTOS)  # testA, testB too
    sample_hf_dataset().save_to_disk(str(data / "hf"))


def jsonable(value: Any, data: Path) -> Any:
    """`value` as JSON keeps it, its type named (`1` and `1.0` differ), the layouts' folder as `<DATA>`."""
    if isinstance(value, (list, tuple)):
        return {"list": [jsonable(v, data) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): jsonable(v, data) for k, v in value.items()}}
    if isinstance(value, str):
        return {"str": value.replace(str(data), DATA)}
    if value is None or isinstance(value, (bool, int, float)):
        return {type(value).__name__: value}
    raise TypeError(f"no JSON form for {value!r}")


def dumped(golden: dict[str, dict[str, Any]]) -> str:
    """`golden` as JSON, one line per flag."""
    cases = [f"  {json.dumps(name)}: {{\n" + ",\n".join(f"    {json.dumps(key)}: {json.dumps(value)}"
                                                         for key, value in flags.items()) + "\n  }"
             for name, flags in golden.items()]
    return "{\n" + ",\n".join(cases) + "\n}\n"


def load_script():
    spec = importlib.util.spec_from_file_location("train_rec_golden", ROOT / "examples" / "train_rec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsed(train_rec, data: Path) -> dict[str, dict[str, Any]]:
    """Every case's namespace, JSON-able."""
    out = {}
    for name, (mode, argv) in cases(data).items():
        args = train_rec.parse_args(argv) if mode == "parse_args" else train_rec.build_parser().parse_args(argv)
        out[name] = {key: jsonable(value, data) for key, value in sorted(vars(args).items())}
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("golden_layouts")
    write_layouts(data)
    return data


def test_every_input_parses_to_the_golden_namespace(layouts, monkeypatch):
    monkeypatch.chdir(ROOT)
    golden = json.loads(GOLDEN.read_text())
    now = parsed(load_script(), layouts)
    assert list(now) == list(golden)
    for name in golden:
        assert now[name] == golden[name], name


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_layouts(Path(folder))
        GOLDEN.write_text(dumped(parsed(load_script(), Path(folder))))
    print(f"wrote {GOLDEN.relative_to(ROOT)}")
