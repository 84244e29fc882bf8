"""Writing files and folders so that a reader never sees them half-written.

Everything the project puts into ``nnUNet_raw``, ``nnUNet_preprocessed`` or ``nnUNet_results`` goes
through these helpers: write under a temporary name in the same folder, then rename (atomic on
POSIX file systems).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_as_umask_allows(path: str | os.PathLike) -> None:
    """Give a temporary file or folder (created 0600/0700 by ``tempfile``) the permissions a plain ``open`` or
    ``mkdir`` would have given it, so that colleagues on a shared server can read what is written."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def write_json_atomic(data, path: str | os.PathLike, indent: int | None = 2) -> None:
    """Serialise ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=False, allow_nan=True)
            f.write("\n")
        readable_as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        readable_as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def staged_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; move it to ``final`` only on success.

    If the block raises, the temporary folder is deleted and ``final`` is untouched. An existing
    ``final`` is an error unless ``overwrite`` is set, in which case it is replaced only after the
    new content is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"{final} already exists. Remove it, or pass the overwrite flag to replace it."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    readable_as_umask_allows(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
