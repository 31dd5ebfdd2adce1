"""Small helpers used across the package."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from lcl_megatron.errors import UserError


class DiskFull(UserError):
    """A write failed because its file system has no space left."""


_FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file or directory made by mkstemp/mkdtemp (always 0600/0700) the mode a plain
    open() or mkdir() would, so that teammates the umask lets read a run can read it."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary sibling of `path`, then rename it into place: readers
    see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        follow_umask(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        # Writers report a full disk in their own words (torch: "unexpected pos"); ask the disk
        # while the partial file still fills it.
        stat = os.statvfs(path.parent)
        if getattr(e, "errno", None) == errno.ENOSPC or stat.f_bavail * stat.f_frsize < _FULL_BELOW:
            raise DiskFull(f"the disk is full: could not write '{path}'") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_markdown_section(path: Path, heading: str, section: str) -> None:
    """Replace the `heading` section of a markdown file (up to the next `## `), or append it,
    leaving the other sections alone; `section` starts with its heading line."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    section = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
