"""Writing output files: whole or not at all, with the permissions the user's umask gives."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TextIO


def follow_umask(path: str | Path) -> None:
    """Gives a file or folder made by tempfile (0600 / 0700) the mode `open` or `mkdir` would have given it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def tree_follows_umask(folder: str | Path) -> None:
    """Gives every file and folder below `folder` (itself included) the mode the umask gives.

    For what libraries write through a temporary file: safetensors 0.8 (model weights, adapters, checkpoints)
    makes its files 0600, which colleagues and serving accounts cannot read.
    """
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")] if folder.exists() else []:
        if not path.is_symlink():
            follow_umask(path)


def cannot_write_in(folder: str | Path) -> str | None:
    """Why files cannot be created in `folder` (made with its parents when missing): one line, or None when they can.

    Checked on the nearest folder that exists, with the effective user's rights, before any work starts.
    """
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    effective = os.access in os.supports_effective_ids
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
        return f"no permission to write in {existing}"
    return None


def write_atomically(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Writes `path` (UTF-8 text, or bytes when `binary`) through a temporary file renamed into place.

    A reader, or a run killed mid-write, sees the old file or the new one, never half of one.
    The file gets the mode a plain `open(path, "w")` would (mkstemp's is 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        follow_umask(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON (UTF-8), written atomically."""
    write_atomically(path, lambda f: json.dump(data, f, indent=2, ensure_ascii=False, default=str))


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """One JSON object per line (UTF-8), written atomically."""

    def write(f: TextIO) -> None:
        for row in rows:  # U+2028/9 escaped: str.splitlines and JavaScript split lines at them
            line = json.dumps(row, ensure_ascii=False)
            f.write(line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n")

    write_atomically(path, write)
