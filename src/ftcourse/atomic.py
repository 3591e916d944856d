"""Atomic writes: a reader sees the old file (or folder) or the whole new one, never half of either.

Every module that writes a result the reader keeps (GGUF files, a Modelfile, a merged model folder, a
data set) writes it through `atomic_output` or `atomic_folder`: the work goes to a temporary name in the
same folder, and only a block that finishes renames it into place. Ctrl-C, an exception or a full disk
leave the previous version untouched and no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputError(RuntimeError):
    """An output path that cannot be written: the message names the path, the reason and what to do."""


def check_output_file(out_path: str | os.PathLike) -> Path:
    """The output path as a Path, after checking that a file can be created there; raises OutputError."""
    out_path = Path(out_path).expanduser()
    if out_path.is_dir():
        raise OutputError(f"Cannot write {out_path}: it is a folder, and a file is expected there.")
    for parent in out_path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"Cannot write {out_path}: {parent} is a file, not a folder.")
            try:  # a real probe: permission bits do not tell for root, read-only mounts or /proc
                with tempfile.TemporaryFile(dir=parent):
                    pass
            except OSError as error:
                raise OutputError(
                    f"Cannot write {out_path}: {parent} is not writable ({error.strerror}). Choose an output "
                    f"folder you can write to."
                ) from error
            break
    return out_path


def _partial_name(path: Path) -> Path:
    """A hidden temporary name beside path, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextmanager
def atomic_output(out_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside out_path; rename it to out_path only if the block succeeds."""
    out_path = check_output_file(out_path)
    tmp = _partial_name(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()  # fail now, with a clear message, rather than after minutes of work
    except OSError as error:
        raise OutputError(
            f"Cannot write {out_path}: {error.strerror}. Choose an output folder you can write to."
        ) from error
    try:
        yield tmp
        # Same folder, so the rename is atomic: readers see the old file or the whole new one, never half.
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside out_dir; it replaces out_dir as a whole only if the block succeeds."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Cannot write folder {out_dir}: a file of that name is in the way.")
    check_output_file(out_dir / "probe")  # the parent chain is writable
    tmp, old = _partial_name(out_dir), out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as error:
        raise OutputError(
            f"Cannot write folder {out_dir}: {error.strerror}. Choose an output folder you can write to."
        ) from error
    try:
        yield tmp
        # Two renames: the old folder steps aside, the new one takes its name. Between them the name is
        # briefly missing, but it never holds a mix of old and new files.
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
