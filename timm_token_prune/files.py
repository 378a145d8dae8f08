"""Files the library writes: whole or not at all (a temporary name, then a rename), and with the permissions a
plain `open` / `mkdir` would give them (0o666 / 0o777 less the umask), not the private 0o600 / 0o700 of
`tempfile.mkstemp` / `mkdtemp`, so that another account (a server) can read them when the umask allows."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike) -> None:
    """Give `path` (a file or folder we created) the mode a plain `open` / `mkdir` would have."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it gets normal permissions and is renamed
    to `path`. On error `path` is untouched and the temporary file is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        normal_permissions(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
