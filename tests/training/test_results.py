"""peft_m2ist.training.results: results.json's `splits` and the table results.md, in the paper's layout."""

from __future__ import annotations

import json

from peft_m2ist.training import RESULTS_FILE, RESULTS_TABLE_FILE, split_results, write_results

SHAPES = {"val": {"accuracy": 0.81349, "mean_iou": 0.712345, "num_samples": 1000, "accuracy_attribute": 0.9,
                  "accuracy_relation": 0.655, "accuracy_position": 0.8, "accuracy_ordinal": 0.7}}
REAL = {"val": {"accuracy": 0.8135, "mean_iou": 0.7, "num_samples": 10834, "accuracy_unknown": 0.8135},
        "testA": {"accuracy": 0.82674, "mean_iou": 0.71, "num_samples": 5657, "accuracy_unknown": 0.82674}}


def test_real_data_rows_have_accuracy_in_percent_with_two_decimals_and_no_unknown_type_column(tmp_path):
    splits = split_results(REAL)
    assert splits == {"val": {"accuracy": 0.8135, "mean_iou": 0.7, "num_samples": 10834},
                      "testA": {"accuracy": 0.82674, "mean_iou": 0.71, "num_samples": 5657}}
    reports = {"val": {"source": "refs(unc).p", "kept": 10834, "skipped": {"box_outside_image": 2},
                       "num_skipped": 2}, "testA": {"source": "refs(unc).p", "kept": 5657, "skipped": {},
                                                    "num_skipped": 0}}
    text = write_results(tmp_path / "out", {"splits": splits, "load_reports": reports}, "RefCOCO (unc)")
    assert text == (tmp_path / "out" / RESULTS_TABLE_FILE).read_text()
    assert text.splitlines() == [
        "RefCOCO (unc)", "",
        "| split | Acc@0.5 (%) | mean IoU | samples |",
        "| --- | ---: | ---: | ---: |",
        "| val | 81.35 | 0.7000 | 10834 |",
        "| testA | 82.67 | 0.7100 | 5657 |",
        "", "Skipped records (--on_bad_record skip): val: 2 {'box_outside_image': 2}",
    ]
    assert json.loads((tmp_path / "out" / RESULTS_FILE).read_text())["splits"] == splits


def test_the_shapes_benchmark_keeps_its_per_phrase_type_columns(tmp_path):
    splits = split_results(SHAPES)
    assert splits == SHAPES
    lines = write_results(tmp_path, {"splits": splits}, "shapes").splitlines()
    assert lines[2] == ("| split | Acc@0.5 (%) | mean IoU | samples | attribute Acc@0.5 (%) | ordinal Acc@0.5 (%) | "
                        "position Acc@0.5 (%) | relation Acc@0.5 (%) |")
    assert lines[4] == "| val | 81.35 | 0.7123 | 1000 | 90.00 | 70.00 | 80.00 | 65.50 |"
    assert len(lines) == 5


def test_package_versions_name_the_installed_ones():
    """results.json records the versions a run used: the same command scores otherwise under other versions."""
    import importlib.metadata
    import platform

    from peft_m2ist.training.results import PACKAGES, package_versions

    versions = package_versions()
    assert versions["python"] == platform.python_version()
    assert set(versions) == {"python", *PACKAGES}
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["transformers"] == importlib.metadata.version("transformers")
