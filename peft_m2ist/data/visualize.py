"""Drawing REC records: images with their box and phrase (for docs and eyeballing)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np


def plot_samples(
    dataset: Sequence[dict],
    path: str | os.PathLike,
    num: int = 8,
    seed: int = 0,
    columns: int = 4,
) -> None:
    """Save a grid of ``num`` random records of ``dataset`` to the PNG ``path``.

    Each panel shows the image, the ``bbox`` (``[x0, y0, x1, y1]`` pixels) as a red rectangle and
    the phrase with its ``phrase_type`` as title. Uses matplotlib's non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(num, len(dataset)), replace=False)
    rows = int(np.ceil(len(indices) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices):
        record = dataset[int(index)]
        x0, y0, x1, y1 = record["bbox"]
        # imshow puts pixel (i, j) centred on (j, i): its edges sit at -0.5 / +0.5, so shift the box.
        ax.imshow(np.asarray(record["image"]), interpolation="nearest")
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.5))
        title = f"{record['phrase']} [{record.get('phrase_type', 'unknown')}]"
        ax.set_title("\n".join(textwrap.wrap(title, 30)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PREDICTION_COLOUR = (230, 30, 30)
TRUTH_COLOUR = (20, 170, 60)


def draw_box(image, box: Sequence[float], colour: tuple[int, int, int] = PREDICTION_COLOUR, width: int | None = None):
    """A copy of the PIL ``image`` with ``box`` (``[x0, y0, x1, y1]`` pixels) drawn as a rectangle.

    ``width`` defaults to about 0.5% of the image's long side (at least 2 px), so the box shows at any size.
    """
    from PIL import ImageDraw

    out = image.convert("RGB")
    if width is None:
        width = max(2, round(max(out.size) / 200))
    ImageDraw.Draw(out).rectangle([float(c) for c in box], outline=colour, width=width)
    return out
