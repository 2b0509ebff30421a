"""Writing charts: the file name checked (paths.output_path) and the PNG written whole (paths.write_whole)."""

from __future__ import annotations

import io
from pathlib import Path

from openlpu.paths import output_path, write_whole


def png_path(path: str | Path, what: str) -> Path:
    """`path` if a PNG can be written there; callers check it before the work that draws the chart."""
    return output_path(path, what, ".png")


def save_png(fig, path: str | Path, what: str) -> Path:
    """Write a matplotlib figure to `path` as a PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        png_path(path, what)
        image = io.BytesIO()
        fig.savefig(image, dpi=110, format="png", bbox_inches="tight")  # a legend beside the axes included
    finally:
        plt.close(fig)
    return write_whole(path, image.getvalue(), what)
