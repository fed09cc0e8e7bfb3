"""A disk cache of the frozen towers' outputs, memory-mapped, so that training runs only the side network and the head.

Without augmentation the towers' outputs for a sample never change. `build_feature_cache` runs the towers once over a
split and writes their outputs as `.npy` files in a folder, which every process then memory-maps read-only: the
operating system's page cache holds one copy per machine, whatever the number of processes, and the split may be
larger than the RAM. The vision tower runs once per image and its outputs are stored once per image (the expressions
of one `image_id` share them; RefCOCO has 7 expressions per image); the text tower's outputs are stored once per
expression. Before writing, the build logs the size on disk and refuses to start when the disk lacks the room.

Who builds it (`scope`): with `"global"` (the default) the global main process builds the cache and every process
maps that one folder, which must then be shared by all machines (a network file system); with `"node"` the local main
process of each machine builds its own copy in the same path on that machine's disk (a node-local scratch folder,
the common case on clusters), and the processes of each machine map their machine's copy.

A finished cache is one folder per split, renamed into place at the end (an interrupted build leaves only
`<split>.tmp`, rebuilt next time), with `manifest.json` recording a fingerprint of what produced it (the towers'
weights and configs, the active adapter's taps, the data and its preprocessing). A later run with the same
fingerprint (a resumed run, or another run pointed at the same `--feature_cache_dir`) reuses it; a different
fingerprint rebuilds it.

Layout of `<cache_dir>/<split>/`: `manifest.json`; `vision_<i>.npy` `(num_images, ...)` and `text_<i>.npy`
`(num_records, ...)` per `TowerFeatures.to_tensors()` key (the manifest maps keys to files); `image_index.npy`
`(num_records,)` (the row of each record's image); `labels.npy` `(num_records, 4)` (`cxcywh`, normalised to [0, 1],
as the collator returns them); `phrase_types.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..towers.layouts import get_tower
from ..towers.quantization import plain_tensors
from .atomic import fresh_tmp_dir, read_json, replace_dir, write_json

logger = get_logger(__name__)

CacheScope = Literal["global", "node"]
CACHE_SCOPES: tuple[str, ...] = ("global", "node")
"""`"global"`: one cache built by the global main process in a folder every machine sees; `"node"`: one per machine,
built by its local main process in a folder of its own disk."""

CACHE_FORMAT = 1
"""Bumped when the files' layout changes: a cache of another format is rebuilt."""
DISK_MARGIN = 1.05
"""The free disk space a build asks for, as a multiple of the cache's size."""


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` on the CPU as a NumPy array; bfloat16 (which NumPy lacks) as its raw 16 bits."""
    tensor = tensor.detach().cpu()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `_to_numpy` for a value stored as `dtype` (a torch dtype's name)."""
    tensor = torch.from_numpy(np.array(array))  # a copy: the memory map is read-only
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def feature_cache_message(cache_features: bool, augment: bool) -> str:
    """One line for the log: whether the towers' outputs are cached, and why."""
    if cache_features:
        return "tower-feature cache on (--cache_features, the default without --augment)"
    if augment:
        return "tower-feature cache off: --augment changes the images every epoch (the towers run at every step)"
    return "tower-feature cache off (--no-cache_features): the towers run at every step"


class CachedTowerFeatures(Dataset):
    """One split's cached tower outputs (`model(tower_features=...)`), labels and phrase types, from the folder
    `build_feature_cache` wrote. The arrays are memory-mapped read-only, opened lazily (so DataLoader workers
    receive the folder's path, not the arrays)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.manifest = read_json(self.folder / "manifest.json", hint=f": delete {self.folder} to rebuild it")
        self.phrase_types: list[str] = read_json(self.folder / "phrase_types.json")
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.manifest["num_records"]

    @property
    def num_images(self) -> int:
        return self.manifest["num_images"]

    def arrays(self) -> dict[str, np.ndarray]:
        """File stem -> its memory-mapped array (opened on first use, in each process)."""
        if self._arrays is None:
            self._arrays = {path.stem: np.load(path, mmap_mode="r") for path in self.folder.glob("*.npy")}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = self.arrays()
        image = int(arrays["image_index"][index])
        features = {}
        for side, row in (("vision", image), ("text", index)):
            for key, file in self.manifest[side].items():
                features[key] = _from_numpy(arrays[file][row], self.manifest["dtypes"][file])
        return {"tower_features": features, "labels": torch.from_numpy(np.array(arrays["labels"][index])),
                "phrase_type": self.phrase_types[index]}


def image_keys(dataset: Any) -> list[str] | None:
    """Each record's `image_id` when the dataset has that column (the real-format loaders write it), else `None`:
    every record then has an image of its own."""
    if "image_id" in (getattr(dataset, "column_names", None) or ()):
        return [str(key) for key in dataset["image_id"]]
    return None


PREPROCESSING_FLAGS = ("vision_model", "text_model", "image_size", "max_text_tokens", "control")
"""The training script's flags that change what the towers see of a record (augmentation turns the cache off)."""


def preprocessing_of(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The `PREPROCESSING_FLAGS` of the training script's `flags` (its `vars(args)`)."""
    return {name: flags.get(name) for name in PREPROCESSING_FLAGS}


def data_fingerprint(dataset: Any, preprocessing: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a split's cached features depend on besides the towers: the dataset's own fingerprint (`datasets`
    records every `select`/`map` in it) and the `preprocessing` (image processor, tokenizer, sizes); `None` for a
    dataset without a fingerprint (its cache is then rebuilt every run)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    return None if fingerprint is None else {"dataset": fingerprint, **preprocessing}


def towers_fingerprint(model: Any) -> dict[str, Any]:
    """What the cached features depend on in `model`: the active adapter's taps, the sizes, and a digest of each
    tower's class and config and of the pair's weights and buffers (the first values of each tensor, with names,
    shapes and dtypes; of the tensors a quantized weight stores, so int8 towers never share float32 towers' cache;
    the side networks and heads live on the tuner, not in the pair)."""
    config = model.peft_config[model.active_adapter]
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*model.base_model.model.named_parameters(), *model.base_model.model.named_buffers()]:
        for stored in plain_tensors(tensor):  # a quantized weight (int8 towers): its int8 values and scales
            flat = stored.detach().reshape(-1)[:64].float().cpu()
            digest.update(f"{name}{tuple(stored.shape)}{stored.dtype}".encode())
            digest.update(flat.numpy().tobytes())
    for path in (config.vision_tower, config.text_tower):
        tower = get_tower(model.base_model.model, path, "tower")
        tower_config = getattr(tower, "config", None)
        digest.update(f"{type(tower).__name__}{tower_config.to_json_string() if tower_config else ''}".encode())
    side = model.base_model.m2ist_side[model.active_adapter]
    return {"format": CACHE_FORMAT, "taps": side.tap_names(), "vision_tower": config.vision_tower,
            "text_tower": config.text_tower, "image_size": config.image_size,
            "max_text_tokens": config.max_text_tokens, "weights": digest.hexdigest()}


def _pixels_digest(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> bytes:
    """A digest of a strided sample of one image's model inputs: records that share an `image_id` must agree."""
    sample = pixel_values.reshape(-1)[::97].float().cpu().numpy().tobytes()
    if pixel_mask is not None:
        sample += pixel_mask.reshape(-1)[::97].cpu().numpy().tobytes()
    return hashlib.blake2b(sample, digest_size=16).digest()


class _CacheWriter:
    """Writes one split's cache into a temporary folder, batch after batch."""

    def __init__(self, folder: Path, keys: Sequence[str] | None, num_records: int, desc: str) -> None:
        self.folder, self.desc, self.num_records = folder, desc, num_records
        self.keys = list(keys) if keys is not None else [str(i) for i in range(num_records)]
        order = dict.fromkeys(self.keys)
        self.image_rows = {key: row for row, key in enumerate(order)}
        self.digests: dict[int, bytes] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, dict[str, str]] = {"vision": {}, "text": {}}
        self.dtypes: dict[str, str] = {}  # file -> the torch dtype's name
        self.phrase_types: list[str] = []
        self.filled = 0

    def _allocate(self, vision: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> None:
        per_image = sum(v[0].numel() * v.element_size() for v in vision.values())
        per_record = sum(v[0].numel() * v.element_size() for v in text.values()) + 4 * 4 + 8
        needed = per_image * len(self.image_rows) + per_record * self.num_records
        free = shutil.disk_usage(self.folder).free
        logger.info(f"{self.desc}: {needed / 1e9:.2f} GB on disk in {self.folder.parent} ({len(self.image_rows)} "
                    f"images x {per_image / 1e6:.3f} MB + {self.num_records} expressions x {per_record / 1e6:.3f} MB)",
                    main_process_only=True)
        if needed * DISK_MARGIN > free:
            raise OSError(
                f"{self.desc}: the tower-feature cache needs {needed / 1e9:.2f} GB but {self.folder.parent} has "
                f"{free / 1e9:.2f} GB free. Point --feature_cache_dir at a larger disk, train with --no-cache_features "
                "(the towers then run at every step), with --tower_dtype bfloat16 (half the size) or with fewer "
                "tapped layers (--num_tapped_layers)."
            )
        for side, tensors, rows in (("vision", vision, len(self.image_rows)), ("text", text, self.num_records)):
            for i, (key, value) in enumerate(tensors.items()):
                file = f"{side}_{i}"
                self.files[side][key] = file
                self.dtypes[file] = str(value.dtype).removeprefix("torch.")
                self.arrays[file] = np.lib.format.open_memmap(
                    self.folder / f"{file}.npy", mode="w+", dtype=_to_numpy(value[:1]).dtype,
                    shape=(rows, *value.shape[1:]))
        self.arrays["image_index"] = np.array([self.image_rows[key] for key in self.keys], dtype=np.int64)
        self.arrays["labels"] = np.lib.format.open_memmap(self.folder / "labels.npy", mode="w+", dtype=np.float32,
                                                          shape=(self.num_records, 4))

    def add(self, model: Any, batch: dict[str, Any], device: torch.device) -> None:
        """Run the towers on one batch of the collator (records in dataset order) and write their outputs."""
        size = len(batch["labels"])
        start, self.filled = self.filled, self.filled + size
        pixel_mask = batch.get("pixel_mask")
        new, new_rows = [], []
        for i in range(size):
            row = self.image_rows[self.keys[start + i]]
            digest = _pixels_digest(batch["pixel_values"][i], None if pixel_mask is None else pixel_mask[i])
            if row not in self.digests:
                self.digests[row] = digest
                new.append(i)
                new_rows.append(row)
            elif self.digests[row] != digest:
                raise ValueError(
                    f"{self.desc}: records share image_id {self.keys[start + i]!r} but their images differ (record "
                    f"{start + i}); the feature cache stores one image's features once per image_id. Give each image "
                    "its own image_id, or train with --no-cache_features."
                )
        vision = {}
        if new:
            pick = torch.tensor(new)
            vision = model.encode_vision(batch["pixel_values"][pick].to(device),
                                         None if pixel_mask is None else pixel_mask[pick].to(device))
        text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        if not self.arrays:
            self._allocate(vision, text)
        for key, file in self.files["vision"].items():
            if new:
                self.arrays[file][new_rows] = _to_numpy(vision[key])
        for key, file in self.files["text"].items():
            self.arrays[file][start:self.filled] = _to_numpy(text[key])
        self.arrays["labels"][start:self.filled] = batch["labels"].float().numpy()
        self.phrase_types += list(batch["phrase_type"])

    def finish(self, fingerprint: Mapping[str, Any]) -> None:
        if self.filled != self.num_records:
            raise RuntimeError(f"{self.desc}: the loader gave {self.filled} records of {self.num_records}")
        np.save(self.folder / "image_index.npy", self.arrays["image_index"])
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        write_json(self.folder / "phrase_types.json", self.phrase_types)
        write_json(self.folder / "manifest.json", {"fingerprint": fingerprint, "num_records": self.num_records,
                                                   "num_images": len(self.image_rows), **self.files,
                                                   "dtypes": self.dtypes})


def cache_is_current(folder: Path, fingerprint: Mapping[str, Any]) -> bool:
    """Whether `folder` holds a finished cache made from `fingerprint` (a fingerprint with an unknown part, None,
    never matches: such data cannot be told apart from other data)."""
    manifest = folder / "manifest.json"
    if not manifest.exists() or any(v is None for v in fingerprint.values()):
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") == json.loads(
            json.dumps(fingerprint))
    except (OSError, json.JSONDecodeError):
        return False


def is_cache_builder(accelerator: Accelerator, scope: CacheScope = "global") -> bool:
    """Whether this process builds the cache: the global main process (`scope="global"`) or each machine's local
    main process (`scope="node"`)."""
    if scope not in CACHE_SCOPES:
        raise ValueError(f"feature cache scope must be one of {CACHE_SCOPES}, got {scope!r}")
    return accelerator.is_main_process if scope == "global" else accelerator.is_local_main_process


def build_feature_cache(model: Any, loader: DataLoader, folder: str | os.PathLike, accelerator: Accelerator,
                        desc: str, data_fingerprint: Any = None, scope: CacheScope = "global") -> CachedTowerFeatures:
    """The split of `loader` as a `CachedTowerFeatures` in `folder`, built by the global main process (`scope=
    "global"`) or by each machine's local main process (`scope="node"`, a node-local `folder`) unless a finished
    cache of the same towers, taps and data (`data_fingerprint`, e.g. the dataset's fingerprint and preprocessing;
    None: unknown, always rebuilt) is already there; the other processes wait, then memory-map it.

    `loader` yields the collator's batches (`labels` and `phrase_type` included); the cache reads its dataset in
    order with the same collator and workers. The global random state is left as it was.
    """
    folder = Path(folder)
    fingerprint = {**towers_fingerprint(model), "data": data_fingerprint}
    if is_cache_builder(accelerator, scope):
        if cache_is_current(folder, fingerprint):
            logger.info(f"{desc}: reusing {folder} (same towers, taps and data)", main_process_only=scope == "global")
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = fresh_tmp_dir(folder)
            tmp.mkdir()
            dataset = loader.dataset
            writer = _CacheWriter(tmp, image_keys(dataset), len(dataset), desc)
            ordered = DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                                 num_workers=loader.num_workers)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                for batch in tqdm(ordered, desc=desc, disable=not accelerator.is_local_main_process):
                    writer.add(model, batch, accelerator.device)
            writer.finish(fingerprint)
            replace_dir(tmp, folder)
    accelerator.wait_for_everyone()
    return CachedTowerFeatures(folder)


def cached_loaders(model: Any, train_loader: DataLoader, eval_loaders: Mapping[str, DataLoader],
                   accelerator: Accelerator, batch_size: int, cache_dir: str | os.PathLike,
                   preprocessing: Mapping[str, Any] | None = None,
                   scope: CacheScope = "global") -> tuple[DataLoader, dict[str, DataLoader]]:
    """Loaders over the cached tower features of the training split (shuffled) and of each evaluation split (split
    name -> loader), in place of the image loaders; the caches live in `cache_dir/train` and `cache_dir/eval-<split>`,
    reused when their towers, taps, data and `preprocessing` (see `data_fingerprint`; None: never reused) match.
    `scope`: who builds them (`build_feature_cache`), `"node"` for a `cache_dir` on each machine's own disk.

    Moves `model` to the accelerator's device to run the towers there.
    """
    model.to(accelerator.device)
    cache_dir = Path(cache_dir)

    def build(loader: DataLoader, folder: str, desc: str) -> CachedTowerFeatures:
        data = None if preprocessing is None else data_fingerprint(loader.dataset, preprocessing)
        return build_feature_cache(model, loader, cache_dir / folder, accelerator, desc, data, scope)

    train = build(train_loader, "train", "caching tower features (train)")
    evals = {name: build(loader, f"eval-{name}", f"caching tower features ({name})")
             for name, loader in eval_loaders.items()}
    return (DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=train_loader.num_workers),
            {name: DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=loader.num_workers)
             for (name, data), loader in zip(evals.items(), eval_loaders.values())})
