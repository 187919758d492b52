"""Private files: MLX_MANAGER_HOME holds API key hashes and, with log_content, prompts, so what
the server creates there is readable by its owner only. Modes are set at creation (not by a
process umask, which would also make downloaded models private); folders that exist already
are left as they are (MLX_MANAGER_HOME may be a folder the user shares on purpose)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents with mode 0700 (Path.mkdir gives parents the
    default mode)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass  # another process made it meanwhile
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty with mode 0600 unless it exists; an existing file of ours is made
    0600 too (it is ours alone to read, whatever an older version left)."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        with contextlib.suppress(OSError):  # not ours to change: leave it
            os.chmod(path, FILE_MODE)
    return path


def open_append(path: Path) -> int:
    """A file descriptor appending to `path`, created 0600."""
    private_dir(path.parent)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
