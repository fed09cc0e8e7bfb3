"""An in-RAM cache of the frozen towers' outputs, so that training runs only the side network and the head.

The towers are frozen, so their outputs for a sample never change (without augmentation): `cache_tower_features`
runs them once over a split into whole-split CPU tensors, after `allocate_feature_cache` has checked that these
fit in RAM, and `CachedTowerFeatures` serves them per sample as `tower_features` for `model(tower_features=...)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

logger = get_logger(__name__)

CACHE_MEMORY_FRACTION = 0.8
"""The most of the machine's available RAM that the feature caches of its processes may take together."""


def feature_cache_message(cache_features: bool, augment: bool) -> str:
    """One line for the log: whether the towers' outputs are cached, and why."""
    if cache_features:
        return "tower-feature cache on (--cache_features, the default without --augment)"
    if augment:
        return "tower-feature cache off: --augment changes the images every epoch (the towers run at every step)"
    return "tower-feature cache off (--no-cache_features): the towers run at every step"


class CachedTowerFeatures(Dataset):
    """Per-sample frozen-tower outputs (`encode_towers`), labels and phrase types, for training on the side only."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor, phrase_types: list[str]) -> None:
        self.features, self.labels, self.phrase_types = features, labels, phrase_types

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tower_features": {k: v[index] for k, v in self.features.items()}, "labels": self.labels[index],
                "phrase_type": self.phrase_types[index]}


def allocate_feature_cache(first: dict[str, torch.Tensor], num_samples: int, processes_here: int, desc: str,
                           available: int | None = None) -> dict[str, torch.Tensor]:
    """Empty whole-split CPU tensors for `num_samples` samples shaped like the batch `first`, if they fit in RAM.

    Raises `MemoryError` before allocating when the caches of the `processes_here` processes on this machine would
    take more than `CACHE_MEMORY_FRACTION` of the available RAM (`available` bytes, default: psutil's figure).
    """
    per_sample = sum(v[0].numel() * v.element_size() for v in first.values())
    needed = per_sample * num_samples * processes_here
    if available is None:
        import psutil  # the `train` extra

        available = psutil.virtual_memory().available
    if needed > CACHE_MEMORY_FRACTION * available:
        raise MemoryError(
            f"{desc}: the tower-feature cache needs {needed / 2**30:.1f} GiB ({per_sample / 2**20:.2f} MiB per sample "
            f"x {num_samples} samples x {processes_here} process(es) on this machine), but {available / 2**30:.1f} "
            "GiB of RAM is available. Train with --no-cache_features (the towers then run at every step), with "
            "--tower_dtype bfloat16 (half the size), on fewer samples (--train_samples) or with fewer tapped layers "
            "(--num_tapped_layers)."
        )
    return {k: v.new_empty((num_samples, *v.shape[1:]), device="cpu") for k, v in first.items()}


def cache_tower_features(model: Any, loader: DataLoader, accelerator: Accelerator, desc: str) -> CachedTowerFeatures:
    """Run the towers once over `loader` (every process caches the whole split; shard the cached loader later).

    `loader` yields the collator's batches (`labels` and `phrase_type` included). The outputs go straight into
    whole-split tensors, allocated after the first batch once `allocate_feature_cache` has checked that they fit.
    """
    features: dict[str, torch.Tensor] = {}
    labels, phrase_types = [], []
    filled = 0
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        phrase_types += batch.pop("phrase_type")
        labels.append(batch.pop("labels"))
        inputs = {k: v.to(accelerator.device) for k, v in batch.items()}
        outputs = model.encode_towers(**inputs).to_tensors()  # TowerFeatures -> flat dict of (batch, ...) tensors
        if not features:
            features = allocate_feature_cache(outputs, len(loader.dataset), processes_here, desc)
            cache_bytes = sum(v.numel() * v.element_size() for v in features.values())
            logger.info(f"{desc}: {cache_bytes / 2**30:.2f} GiB for {len(loader.dataset)} samples",
                        main_process_only=True)
        batch_size = len(labels[-1])
        for key, value in outputs.items():
            features[key][filled : filled + batch_size] = value
        filled += batch_size
    return CachedTowerFeatures({k: v[:filled] for k, v in features.items()}, torch.cat(labels), phrase_types)


def cached_loaders(model: Any, train_loader: DataLoader, eval_loaders: Mapping[str, DataLoader],
                   accelerator: Accelerator, batch_size: int) -> tuple[DataLoader, dict[str, DataLoader]]:
    """Loaders over the cached tower features of the training split (shuffled) and of each evaluation split (split
    name -> loader), in place of the image loaders.

    Moves `model` to the accelerator's device to run the towers there.
    """
    model.to(accelerator.device)
    train = cache_tower_features(model, train_loader, accelerator, "caching tower features (train)")
    evals = {name: cache_tower_features(model, loader, accelerator, f"caching tower features ({name})")
             for name, loader in eval_loaders.items()}
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            {name: DataLoader(data, batch_size=batch_size, shuffle=False) for name, data in evals.items()})
