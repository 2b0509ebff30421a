"""Writing charts: one place that checks the file name and turns a failed write into one clear error."""

from __future__ import annotations

from pathlib import Path

from openlpu.errors import OpenLPUError


def save_png(fig, path: str | Path, what: str) -> Path:
    """Write a matplotlib figure to `path` as a PNG and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        if path.suffix.lower() != ".png":
            raise OpenLPUError(f"the {what} is a PNG: give a file name ending in .png, not {str(path)!r}")
        fig.savefig(path, dpi=110, format="png")
    except OSError as e:
        raise OpenLPUError(f"cannot write the {what} to {str(path)!r}: {e.strerror or e}; "
                           f"choose a writable file path") from None
    finally:
        plt.close(fig)
    return path
