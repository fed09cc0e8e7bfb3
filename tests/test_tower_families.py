"""The sweep: every vision and text encoder family of `tiny_families` side-tuned with the default `M2ISTConfig` taps.

Each family is paired with a fixed tiny partner (ViT for a text family, BERT for a vision family) and must either work
out of the box (get_peft_model, forward and backward with gradients on adapter parameters only, save and reload with
bit-exact predictions, and for a vision tower the grid check) or be refused with a message naming the family and
the reason. `docs/towers.md` is the table this sweep writes (`python tests/test_tower_families.py` rewrites it).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tiny_families import TEXT_FAMILIES, VISION_FAMILIES, Family

from peft_m2ist import M2ISTConfig, VisionTextPair

ROOT = Path(__file__).resolve().parents[1]
DOCS_TABLE = ROOT / "docs" / "towers.md"
TEXT_TOKENS = 6
VISION_PARTNER, TEXT_PARTNER = VISION_FAMILIES[0], TEXT_FAMILIES[0]  # ViT and BERT

# families refused by name, and a phrase of the reason the message must give
REFUSED = {
    "funnel": "pools tokens between its blocks",
}


def _config(image_size: int) -> M2ISTConfig:
    return M2ISTConfig(bottleneck_dim=8, head_hidden_size=16, head_num_hidden_layers=1, head_num_attention_heads=2,
                       head_intermediate_size=32, max_text_tokens=TEXT_TOKENS, image_size=image_size, head_dropout=0.0)


def _pair(family: Family) -> tuple[VisionTextPair, int, Family, Family]:
    vision = family if family in VISION_FAMILIES else VISION_PARTNER
    text = family if family in TEXT_FAMILIES else TEXT_PARTNER
    return VisionTextPair(vision.build(seed=0), text.build(seed=1)), vision.image_size, vision, text


def _batch(image_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(2, 3, image_size, image_size, generator=g),
            "input_ids": torch.randint(3, 100, (2, TEXT_TOKENS), generator=g),
            "attention_mask": torch.ones(2, TEXT_TOKENS, dtype=torch.long),
            "labels": torch.rand(2, 4, generator=g) * 0.4 + 0.3}


def _grid_check(model, image_size: int) -> None:
    """Changing the bottom-right cell of the image changes the vision token read as that cell (the last token: the
    grid comes last) more than any other token: in the final tokens, or where a tiny random tower's final tokens do
    not depend on the image at all (EfficientNet's, MobileViTV2's), in its first tap brought onto the final grid."""
    shapes = model.peft_config["default"].tower_shapes["vision"]
    rows, cols = shapes["grid"]
    cell_h, cell_w = -(-image_size // rows), -(-image_size // cols)
    image = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(5))
    marked = image.clone()
    marked[:, :, image_size - cell_h :, image_size - cell_w :] += 3.0
    tuner = model.base_model
    after, before = tuner.encode_vision(marked), tuner.encode_vision(image)
    changes = [(after[key] - before[key]).norm(dim=-1)[0] for key in before if key != "vision_mask"]
    change = next(c for c in changes if c.any())
    assert int(change.argmax()) == shapes["num_tokens"] - 1, change


def _run(family: Family, tmp_path: Path) -> None:
    pair, image_size, vision, text = _pair(family)
    model = get_peft_model(pair, _config(image_size))
    model.train()
    batch = _batch(image_size)
    model(**batch).loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(".m2ist_side." in n or ".m2ist_head." in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".m2ist_" not in n)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).pred_boxes
    model.save_pretrained(tmp_path)
    fresh = VisionTextPair(vision.build(seed=0), text.build(seed=1))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).pred_boxes, before)
    if family in VISION_FAMILIES:
        _grid_check(model, image_size)


@lru_cache(maxsize=1)
def sweep() -> dict[str, str]:
    """family name -> "" (works out of the box) or the refusal's message."""
    import tempfile

    results = {}
    for family in VISION_FAMILIES + TEXT_FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _run(family, Path(tmp))
                results[family.name] = ""
            except ValueError as err:
                results[family.name] = str(err)
    return results


def table(results: dict[str, str]) -> str:
    """docs/towers.md: the families, out of the box or refused, and why."""
    def rows(families: list[Family]) -> list[str]:
        return [f"| {f.name} | `{f.model}` | " + ("out of the box |" if not results[f.name] else
                                                 f"refused: {results[f.name].splitlines()[0]} |") for f in families]

    works = sum(not results[f.name] for f in VISION_FAMILIES), sum(not results[f.name] for f in TEXT_FAMILIES)
    return "\n".join([
        "# Tower families",
        "",
        "Written by `python tests/test_tower_families.py` from the sweep of `tests/test_tower_families.py` (which "
        "checks this page is current): every vision and text encoder family below, built tiny from its transformers "
        "config class, side-tuned with the default `M2ISTConfig` taps. *Out of the box* means get_peft_model, forward "
        "and backward (gradients on adapter parameters only), save and reload with bit-exact predictions and, for "
        "vision towers, the grid check (changing the image's bottom-right cell changes the token read as that cell "
        "most).",
        "",
        "Families of the registry (`peft_m2ist/towers/layouts.py`) use its layout; any other tower's blocks, "
        "attention, FFN and embedding are found from its modules (`peft_m2ist/towers/discovery.py`). Stages of "
        "hierarchical towers are tapped whole and average-pooled onto the final grid; extra tokens after the patch "
        "grid (YOLOS's detection tokens) are read before it; DETR-family towers run encoder-only. "
        "`peft_m2ist.tuner.plan.describe_taps(model)` says what a model taps and why.",
        "",
        f"Vision: {works[0]} of {len(VISION_FAMILIES)} out of the box; text: {works[1]} of {len(TEXT_FAMILIES)}.",
        "",
        "| family | model class | result |",
        "| --- | --- | --- |",
        *rows(VISION_FAMILIES),
        *rows(TEXT_FAMILIES),
        "",
    ])


def test_the_families_work_out_of_the_box_or_are_refused_by_name():
    results = sweep()
    working_vision = [f.name for f in VISION_FAMILIES if not results[f.name]]
    working_text = [f.name for f in TEXT_FAMILIES if not results[f.name]]
    assert (len(VISION_FAMILIES), len(TEXT_FAMILIES)) == (37, 29)
    assert len(working_vision) >= 33 and len(working_text) >= 27, results
    refused = {name: message for name, message in results.items() if message}
    assert set(refused) == set(REFUSED), refused
    for name, message in refused.items():
        assert f"model_type '{name}'" in message and REFUSED[name] in message, message


def test_the_family_table_in_the_docs_is_current():
    assert DOCS_TABLE.read_text() == table(sweep()), "run `python tests/test_tower_families.py` to rewrite it"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    DOCS_TABLE.write_text(table(sweep()))
    print(f"wrote {DOCS_TABLE.relative_to(ROOT)}")
