"""The one way data_tools and the plugin write a file that must never be seen half-written.

Every writer goes through a temporary name beside the target (`.NAME.tmp`, same directory, so the rename
is atomic on POSIX) and `os.replace`s it into place only once the content is complete: a run killed at any
point leaves either the old file or the new one, never a truncated one. An OSError from the write (disk
full, permission denied, file too large) is re-raised as `OutputWriteError` naming the *output* path,
because the kernel's ENOSPC/EFBIG carries no file name and the user would otherwise be pointed at whatever
input was being read at the time. The temporary file is removed on failure.

`write_file` is the non-atomic variant for files inside a directory that is itself renamed into place
when complete (convert's per-frame JPEGs): it shares the error naming, and uses os-level calls because with
one file per frame Python's buffered-file layer is a measurable share of the conversion cost.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator


class OutputWriteError(OSError):
    """Writing an output file failed; the message names that file (not an input being read)."""


def _named(err: OSError, path: str | os.PathLike[str]) -> OutputWriteError:
    if isinstance(err, OutputWriteError):
        return err
    reason = err.strerror or str(err)
    return OutputWriteError(err.errno, f"cannot write {os.fspath(path)}: {reason}")


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name used for `path` while it is being written (a dot file beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for streaming writes; it replaces `path` when the block exits normally."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON (ending in a newline) to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_text_if_changed(path: str | os.PathLike[str], text: str) -> bool:
    """Write `text` atomically unless `path` already holds it (keeps mtimes of unchanged files)."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def write_file(path: str, data: bytes) -> None:
    """Write one file in place, non-atomically (see the module docstring for when that is right)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        raise _named(e, path) from e
