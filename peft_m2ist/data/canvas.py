"""The batch's canvases: allocated once per batch, each image normalised straight into its place.

``CanvasBatch(batch, size)`` holds ``pixel_values`` (float32 ``(batch, 3, size, size)``, 0 on padding) and
``pixel_mask`` (int64 ``(batch, size, size)``, 1 on image pixels). ``paste(i, planes, offset)`` normalises float32
RGB planes ``(3, h, w)`` holding levels 0..255 as ``(level / 255 - mean) / std`` in float32 (numpy's and torch's
float32 arithmetic give the same bits here: tests/data/test_fast_augment.py checks every level) and writes them at
``offset = (x, y)``.

Inside a DataLoader worker both tensors are allocated in shared memory, as ``torch.utils.data.default_collate``
does, so handing the batch to the main process copies nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info


def zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)``, in shared memory inside a DataLoader worker.

    The shared storage is a new shared-memory file sized with ``ftruncate``, which reads as zeros (POSIX), so it is
    not written here: the pages the images never cover are never touched in the worker.
    """
    if get_worker_info() is None:
        return torch.zeros(tuple(shape), dtype=dtype)
    # what default_collate does in a worker: the batch goes to the main process without a copy
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(tuple(shape))


class CanvasBatch:
    """Canvases for ``batch`` images on a ``size x size`` canvas (see module docstring for shapes and values).

    Args:
        batch: number of images B.
        size: canvas side S.
        mean, std: per-channel normalisation, 3 values each (of levels scaled to [0, 1]).
    """

    def __init__(self, batch: int, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)
        self.pixel_values = zeros((batch, 3, size, size), torch.float32)
        self.pixel_mask = zeros((batch, size, size), torch.int64)

    def paste(self, index: int, planes: torch.Tensor, offset: tuple[int, int]) -> None:
        """Normalise float32 planes ``(3, h, w)`` of levels 0..255 into canvas ``index`` at ``offset`` ``(x, y)``.

        ``planes`` is overwritten (normalised in place).
        """
        _, height, width = planes.shape
        x, y = offset
        if x < 0 or y < 0 or x + width > self.size or y + height > self.size:
            raise ValueError(f"a {width}x{height} image at offset {offset} does not fit the {self.size} px canvas")
        planes.div_(255.0).sub_(self.mean).div_(self.std)
        self.pixel_values[index, :, y : y + height, x : x + width] = planes
        self.pixel_mask[index, y : y + height, x : x + width] = 1
