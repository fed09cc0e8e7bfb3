"""``towers.json``: which frozen towers (and dtype) an adapter was trained on, as older adapters record it.

The training example used to write ``{"vision": ..., "text": ..., "dtype": ...}`` (tower names as
``load_vision_tower`` / ``load_text_tower`` take them) beside every adapter it saved. Adapters now carry that record in
their ``adapter_config.json`` (``M2ISTConfig.base_towers``), which ``save_pretrained`` and ``push_to_hub`` save with
them; this file is no longer written, and is read only for adapters saved before (``peft_m2ist.loading``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOWERS_FILE = "towers.json"


def read_towers_file(adapter: str) -> tuple[dict[str, Any], str] | None:
    """The adapter's ``towers.json`` and where it was read from, or ``None`` when there is none.

    A local adapter folder is only looked into; for anything else (a Hub id) the file is fetched with
    ``hf_hub_download``, and any failure there (no such file or repository, offline, no network) counts as absent.
    Raises ``ValueError`` for a local ``towers.json`` that is not a JSON object.
    """
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        path = folder / TOWERS_FILE
        if not path.is_file():
            return None
        try:
            towers = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not readable JSON: {err}") from None
        if not isinstance(towers, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(towers).__name__}")
        return towers, str(path)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=adapter, filename=TOWERS_FILE)
        towers = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as err:  # any failure to fetch or parse it means "no towers.json"
        logger.debug("no %s fetched for %r: %s: %s", TOWERS_FILE, adapter, type(err).__name__, err)
        return None
    return (towers, f"{adapter}/{TOWERS_FILE}") if isinstance(towers, dict) else None
