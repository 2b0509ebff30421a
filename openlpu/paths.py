"""Files the tool writes (a Program, a chart): checked before the work that makes them, written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from openlpu.errors import OpenLPUError


def output_path(path: str | Path, what: str, suffix: str | None = None) -> Path:
    """The file `path` names, a symbolic link followed, if one can be written there: a name (with `suffix`, if
    given) in a folder that exists, not a folder itself. Callers check before the work, so a long compile never
    ends in a path it cannot use."""
    text = str(path)
    if suffix and not text.lower().endswith(suffix):
        raise OpenLPUError(f"the {what} is a {suffix.lstrip('.').upper()} file: give a file name ending in {suffix}, "
                           f"not {text!r}")
    if not text:
        raise OpenLPUError(f"no file named for the {what}; give a file path")
    try:
        target = Path(text).resolve() if Path(text).is_symlink() else Path(text)
        if text.endswith(("/", os.sep)) or target.is_dir():
            raise OpenLPUError(f"cannot write the {what} to {text!r}: it names a folder; give a file path")
        folder = target.parent
        if not folder.is_dir():
            raise OpenLPUError(f"cannot write the {what} to {text!r}: {str(folder)!r} "
                               f"{'is a file, not a folder' if folder.exists() else 'does not exist'}; choose "
                               f"another path")
    except (OSError, RuntimeError) as e:  # a name the file system cannot hold; a loop of links (RuntimeError)
        reason = getattr(e, "strerror", None) or e
        raise OpenLPUError(f"cannot write the {what} to {text!r}: {reason}; choose another path") from None
    if not (target.exists() and not target.is_file()):  # a device or a pipe is written into, not beside
        try:
            with tempfile.TemporaryFile(dir=folder):  # as write_whole will write there: a file of its own
                pass
        except OSError as e:
            raise OpenLPUError(f"cannot write the {what} to {text!r}: {str(folder)!r} takes no new file "
                               f"({e.strerror or e}); choose a writable folder") from None
    return target


def write_whole(path: str | Path, data: bytes, what: str) -> Path:
    """Write `data` to `path` (output_path's checks first) through a file of its own beside it, renamed over
    the target only once whole: a failed write leaves an existing file as it was, and no other file is
    touched. A symbolic link is followed, so the file it names is replaced and the link kept. A device or a
    pipe (/dev/null, a FIFO) is written into, never replaced by a file."""
    target = output_path(path, what)
    partial = None
    try:
        if target.exists() and not target.is_file():
            with open(target, "wb") as f:
                f.write(data)
            return target
        partial = target.with_name(f".openlpu-{secrets.token_hex(8)}.partial")
        with open(partial, "xb") as f:  # x: never over a file already there
            f.write(data)
        os.replace(partial, target)
    except OSError as e:
        if partial is not None:
            with contextlib.suppress(OSError):  # the error worth reporting is the write's
                partial.unlink(missing_ok=True)
        raise OpenLPUError(f"cannot write the {what} to {str(path)!r}: {e.strerror or e}; "
                           f"choose a writable file path") from None
    return target
