"""Accuracy-matrix heatmaps of an evaluation run: one panel per matrix, one PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_matrices(
    path: str | os.PathLike[str],
    matrices: Mapping[str, Sequence[Sequence[float]]],
    tasks: Sequence[str],
    *,
    title: str,
    columns: int = 4,
) -> Path:
    """Write heatmaps (rows: after learning task i; columns: evaluated task j) to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    names = list(matrices)
    columns = min(len(names), columns)
    rows = -(-len(names) // columns)
    size = max(3.0, 0.55 * len(tasks) + 1.5)
    fig, axes = plt.subplots(
        rows, columns, figsize=(size * columns, (size + 0.6) * rows), squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[len(names) :]:
        ax.axis("off")
    for index, (ax, name) in enumerate(zip(flat, names, strict=False)):
        matrix = matrices[name]
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                colour = "black" if value > 60 else "white"
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color=colour, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
        first_column = index % columns == 0
        ax.set_yticks(
            range(len(tasks)), [f"after {t}" for t in tasks] if first_column else [], fontsize=7
        )
        ax.set_xlabel("evaluated task", fontsize=8)
    fig.colorbar(image, ax=flat, shrink=0.6, label="accuracy (%)")
    fig.suptitle(title, fontsize=10, y=0.99)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
