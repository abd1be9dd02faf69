"""Writing a file so that a kill at any moment leaves the old file or the new one, never half of one.

    atomic_write(path, lambda tmp: save_file(tensors, tmp))   # any writer that takes a path
    atomic_write_text(path, text)
    write_json(path, data)

The content goes into a temporary file beside `path` (".NAME.XXXX.tmp", which training.py's clean-up
recognises), which is then renamed over `path`: a rename within a folder is atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _default_file_mode()  # what open() would give a new file: 0o644 under the usual umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """write(tmp_path), then rename it to path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _NEW_FILE_MODE)  # mkstemp makes files only their owner can read; results are for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data) -> None:
    """Indented JSON and a final newline."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
