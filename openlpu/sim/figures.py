"""Writing charts: one place that checks the file name and turns a failed write into one clear error."""

from __future__ import annotations

from pathlib import Path

from openlpu.errors import OpenLPUError


def png_path(path: str | Path, what: str) -> Path:
    """`path` if it names a PNG; callers check it before the work that draws the chart."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OpenLPUError(f"the {what} is a PNG: give a file name ending in .png, not {str(path)!r}")
    return path


def save_png(fig, path: str | Path, what: str) -> Path:
    """Write a matplotlib figure to `path` as a PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        path = png_path(path, what)
        fig.savefig(path, dpi=110, format="png")
    except OSError as e:
        raise OpenLPUError(f"cannot write the {what} to {str(path)!r}: {e.strerror or e}; "
                           f"choose a writable file path") from None
    finally:
        plt.close(fig)
    return path
