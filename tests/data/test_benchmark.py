"""The shapes benchmark: determinism, cache, phrases that name exactly one object, boxes, splits."""

from __future__ import annotations

import hashlib
import re

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets import DatasetDict

from peft_m2ist.data import benchmark as bench
from peft_m2ist.data.benchmark import (
    BenchmarkConfig,
    benchmark_stats,
    chance_level,
    heldout_combinations,
    load_shapes_benchmark,
    update_doc,
)
from peft_m2ist.data.phrases import NOUNS, RELATION_WORDS, SIZE_WORDS
from peft_m2ist.data.shapes import COLOURS

SMALL = {"train": 160, "val": 40, "test": 40, "test_heldout": 80}


def digest(dataset: DatasetDict) -> str:
    """sha256 over every split's Arrow table (image bytes included)."""
    sha = hashlib.sha256()
    for split in sorted(dataset):
        sink = pa.BufferOutputStream()
        table = dataset[split].data.table
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        sha.update(split.encode())
        sha.update(sink.getvalue().to_pybytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def small() -> DatasetDict:
    return load_shapes_benchmark(seed=3, use_cache=False, split_sizes=SMALL)


def test_splits_columns_and_sizes(small):
    assert {split: len(data) for split, data in small.items()} == SMALL
    row = small["train"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (128, 128)
    assert len(row["bbox"]) == 4 and isinstance(row["phrase"], str)
    scene_ids = [i for data in small.values() for i in data["scene_id"]]
    assert len(set(scene_ids)) == len(scene_ids)


def test_same_seed_same_bytes_different_seed_different_scenes():
    sizes = {"train": 30, "test_heldout": 10}
    first = load_shapes_benchmark(seed=11, use_cache=False, split_sizes=sizes)
    again = load_shapes_benchmark(seed=11, use_cache=False, split_sizes=sizes)
    other = load_shapes_benchmark(seed=12, use_cache=False, split_sizes=sizes)
    assert digest(first) == digest(again)
    assert digest(first) != digest(other)
    assert first["train"]["bbox"] != other["train"]["bbox"]
    assert first["train"]["phrase"] != other["train"]["phrase"]


def test_cache_is_written_once_and_reloaded(tmp_path, monkeypatch):
    sizes = {"train": 12, "val": 4}
    built = load_shapes_benchmark(seed=5, cache_dir=tmp_path, split_sizes=sizes)
    key = BenchmarkConfig(seed=5, split_sizes=sizes).cache_key()
    assert (tmp_path / key / "dataset_dict.json").exists()

    def no_rebuild(cfg):
        raise AssertionError("the cached build should have been loaded")

    monkeypatch.setattr(bench, "build_benchmark", no_rebuild)
    cached = load_shapes_benchmark(seed=5, cache_dir=tmp_path, split_sizes=sizes)
    assert digest(cached) == digest(built)
    assert BenchmarkConfig(seed=6, split_sizes=sizes).cache_key() != key


# ---- an independent reading of the phrases -------------------------------------------------
NOUN_TO_SHAPE = {word: shape for shape, words in NOUNS.items() for word in words}
SIZE_TO = {word: size for size, words in SIZE_WORDS.items() for word in words}
REL_TO = sorted(((w, d) for d, words in RELATION_WORDS.items() for w in words), key=lambda p: -len(p[0]))
EXTREME_WORDS = {"leftmost": "left", "left-most": "left", "rightmost": "right", "right-most": "right",
                 "topmost": "top", "top-most": "top", "highest": "top", "bottom-most": "bottom", "lowest": "bottom"}
PAIR_WORDS = {"left": "left", "right": "right", "upper": "top", "top": "top", "lower": "bottom", "bottom": "bottom"}


def parse_np(text: str) -> dict:
    *modifiers, noun = text.split()
    described = {} if NOUN_TO_SHAPE[noun] is None else {"shape": NOUN_TO_SHAPE[noun]}
    for word in modifiers:
        if word in SIZE_TO:
            described["size"] = SIZE_TO[word]
        else:
            assert word in COLOURS, f"unknown word {word!r} in {text!r}"
            described["colour"] = word
    return described


def parse(phrase: str) -> tuple:
    if m := re.fullmatch(r"the (second|third) (.+) from the (left|right|top|bottom)", phrase):
        return "ordinal", parse_np(m[2]), m[3], {"second": 2, "third": 3}[m[1]]
    for words, direction in REL_TO:
        if m := re.fullmatch(rf"the (.+) {words} the (.+)", phrase):
            return "relation", parse_np(m[1]), direction, parse_np(m[2])
    if (m := re.fullmatch(r"the (\S+) (.+)", phrase)) and m[1] in EXTREME_WORDS:
        return "position", parse_np(m[2]), EXTREME_WORDS[m[1]], None
    for pattern in (r"the (.+) furthest to the (\w+)", r"the (.+) on the far (\w+)", r"the (.+) at the (\w+)",
                    r"the (.+) on the (\w+)"):
        if m := re.fullmatch(pattern, phrase):
            return "position", parse_np(m[1]), m[2], None
    if (m := re.fullmatch(r"the (\S+) (.+)", phrase)) and m[1] in PAIR_WORDS:
        return "position", parse_np(m[2]), PAIR_WORDS[m[1]], None
    return "attribute", parse_np(phrase.removeprefix("the ")), None, None


def first_coordinate(box, direction: str) -> float:
    """Smaller = further towards ``direction``."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return {"left": cx, "right": -cx, "top": cy, "bottom": -cy}[direction]


def named_objects(row: dict, margin: float) -> list[int]:
    """Objects the phrase names, read independently of the generator; [] if ambiguous."""
    kind, described, direction, extra = parse(row["phrase"])
    objects = [dict(colour=c, shape=s, size=z, box=b) for c, s, z, b in
               zip(row["object_colours"], row["object_shapes"], row["object_sizes"], row["object_boxes"])]

    def matching(d):
        return [i for i, o in enumerate(objects) if all(o[k] == v for k, v in d.items())]

    candidates = matching(described)
    if kind == "attribute":
        return candidates
    if kind == "relation":
        anchors = matching(extra)
        if len(anchors) != 1:
            return []
        a = first_coordinate(objects[anchors[0]]["box"], direction)
        others = [i for i in candidates if i != anchors[0]]
        deltas = {i: a - first_coordinate(objects[i]["box"], direction) for i in others}
        if any(abs(d) <= margin for d in deltas.values()):
            return []
        return [i for i, d in deltas.items() if d > margin]
    rank = 1 if kind == "position" else extra
    ordered = sorted(candidates, key=lambda i: first_coordinate(objects[i]["box"], direction))
    if len(ordered) < rank:
        return []
    values = [first_coordinate(objects[i]["box"], direction) for i in ordered]
    k = rank - 1
    if (k > 0 and values[k] - values[k - 1] <= margin) or (k + 1 < len(values) and values[k + 1] - values[k] <= margin):
        return []
    return [ordered[k]]


def test_every_phrase_names_exactly_its_target(small):
    margin = BenchmarkConfig().margin * 128
    kinds = set()
    for data in small.values():
        for row in data.remove_columns("image"):
            kinds.add(parse(row["phrase"])[0])
            target = row["object_boxes"].index(row["bbox"])
            assert named_objects(row, margin) == [target], row["phrase"]
    assert kinds == {"attribute", "relation", "position", "ordinal"}


def test_parsed_kind_matches_phrase_type(small):
    for row in small["test"].remove_columns("image"):
        assert parse(row["phrase"])[0] == row["phrase_type"]


def test_attribute_phrases_are_minimal(small):
    for row in small["train"].remove_columns("image"):
        if row["phrase_type"] != "attribute":
            continue
        stated = parse(row["phrase"])[1]
        target = row["object_boxes"].index(row["bbox"])
        attributes = {"colour": row["object_colours"], "shape": row["object_shapes"], "size": row["object_sizes"]}
        for drop in stated:
            fewer = {k: v for k, v in stated.items() if k != drop}
            matches = [i for i in range(row["num_objects"]) if all(attributes[k][i] == v for k, v in fewer.items())]
            assert matches != [target], f"{row['phrase']!r} says more than needed"


def test_boxes_sit_tight_on_the_drawn_target(small):
    for row in small["val"]:
        image = np.asarray(row["image"], dtype=np.int32)
        x0, y0, x1, y1 = row["bbox"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        left, top = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        window = image[top : int(np.ceil(y1)) + 1, left : int(np.ceil(x1)) + 1]
        colour = np.asarray(COLOURS[row["target_colour"]])
        ys, xs = np.nonzero(np.abs(window - colour).max(axis=-1) < 40)
        assert xs.size > 0
        assert left + xs.min() >= x0 - 1 and left + xs.max() + 1 <= x1 + 1
        assert top + ys.min() >= y0 - 1 and top + ys.max() + 1 <= y1 + 1
        assert left + xs.min() <= x0 + 2 and left + xs.max() + 1 >= x1 - 2
        assert top + ys.min() <= y0 + 2 and top + ys.max() + 1 >= y1 - 2


def test_heldout_combinations_are_targets_only_in_test_heldout(small):
    heldout = set(heldout_combinations(3))
    assert len(heldout) == BenchmarkConfig().num_heldout
    for split, data in small.items():
        pairs = set(zip(data["target_colour"], data["target_shape"]))
        if split == "test_heldout":
            assert pairs <= heldout
        else:
            assert not pairs & heldout
    distractors = {(c, s) for cs, ss in zip(small["train"]["object_colours"], small["train"]["object_shapes"])
                   for c, s in zip(cs, ss)}
    assert distractors & heldout


def test_chance_level_is_one_over_the_number_of_objects(small):
    for data in small.values():
        expected = float(np.mean([1.0 / n for n in data["num_objects"]]))
        assert chance_level(data) == pytest.approx(expected)
    assert 1 / 6 <= chance_level(small["train"]) <= 1 / 3


def test_chance_level_needs_object_boxes(small):
    with pytest.raises(ValueError, match="object_boxes"):
        chance_level(small["train"].remove_columns("object_boxes"))


def test_stats_table_and_doc_update(small, tmp_path):
    table = benchmark_stats(small)
    assert f"{100 * chance_level(small['test']):.2f}%" in table
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- benchmark-stats:begin -->\nold\n<!-- benchmark-stats:end -->\noutro\n")
    update_doc(doc, table)
    text = doc.read_text()
    assert table in text and "old" not in text and text.startswith("intro") and text.endswith("outro\n")


@pytest.mark.parametrize(
    "params",
    [{"split_sizes": {"dev": 3}}, {"min_objects": 5, "max_objects": 4}, {"background": "space"},
     {"phrase_mix": {"riddle": 1.0}}, {"num_heldout": 0}],
)
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError):
        BenchmarkConfig(**params)


def test_photo_backgrounds_render():
    data = load_shapes_benchmark(seed=1, use_cache=False, split_sizes={"test": 6}, background="photo")
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in data["test"]["image"]])
    assert pixels.std(axis=(1, 2)).mean() > 10


@pytest.mark.slow
def test_default_build():
    data = load_shapes_benchmark(seed=0, use_cache=False)
    assert {split: len(d) for split, d in data.items()} == bench.DEFAULT_SPLIT_SIZES


def test_build_shows_progress_unless_disabled(capsys):
    cfg = BenchmarkConfig(seed=1, split_sizes={"val": 3})
    was_enabled = datasets.is_progress_bar_enabled()
    try:
        datasets.enable_progress_bars()  # whatever HF_DATASETS_DISABLE_PROGRESS_BARS says
        capsys.readouterr()
        assert len(bench.build_split(cfg, "val")) == 3
        err = capsys.readouterr().err
        assert "shapes benchmark: val: 100%" in err and "3/3 [" in err
        datasets.disable_progress_bars()
        bench.build_split(cfg, "val")
        assert "shapes benchmark" not in capsys.readouterr().err
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
