"""Webdataset tar shards: deterministic writing and fault-tolerant reading.

A sample is the group of consecutive tar members sharing a key: the member
name up to the first dot of its base name; the rest is the extension
("doc7.json", "doc7.img0.png" -> key "doc7", extensions "json", "img0.png").
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from lcl_megatron.config import PIPE_PREFIX

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """Tar member name -> (sample key, extension), or None when it has no extension."""
    match = _KEY_EXT.match(name)
    return match.groups() if match else None


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples (key, {extension: bytes}) into a tar whose bytes depend only on the samples."""
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def _last_line(errors) -> str:
    """`: LINE`, the last line a command wrote to its standard error, or nothing."""
    errors.seek(0)
    said = errors.read().decode(errors="replace").strip().splitlines()
    return f": {said[-1]}" if said else ""


class ShardError(IOError):
    """A shard that could not be read to its end."""


def read_shard(path: str | Path) -> Iterator[dict]:
    """Yield samples {"__key__": key, ext: bytes, ...} in order.

    `path` is a tar file or `pipe:COMMAND`, a shell command whose standard output
    is the tar (webdataset's convention: pipe:aws s3 cp s3://bucket/x.tar -).
    Members without an extension are ignored. A truncated or corrupt tar, or a
    command that fails, raises ShardError after the complete samples read before
    the damage were yielded.
    """
    for _, _, sample in read_shard_from(path):
        yield sample


def _seekable(path: str) -> bool:
    """Whether member offsets of `path` are offsets into the file: an uncompressed tar file."""
    if path.startswith(PIPE_PREFIX):
        return False
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError:
        return False  # reading it from the start reports the error as a ShardError
    return not magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def read_shard_from(path: str | Path, start: int = 0) -> Iterator[tuple[int, int, dict]]:
    """(offset of the sample, offset of the next sample, sample) from the sample at `start` on.

    Offsets are those of tar headers in the uncompressed stream, so that a reader
    can stop after any sample and another continue at its next offset. An
    uncompressed tar file is entered by seeking to `start`; a compressed one or a
    pipe is read from its beginning, skipping the members before `start` without
    keeping their bytes. Errors as read_shard's.
    """
    path = str(path)
    current: dict | None = None
    current_offset = 0
    command = path[len(PIPE_PREFIX):] if path.startswith(PIPE_PREFIX) else None
    proc = errors = raw = None
    base = start if start and _seekable(path) else 0
    try:
        if command is not None:
            errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)
            tar_file = tarfile.open(fileobj=proc.stdout, mode="r|*")
        elif base:
            raw = open(path, "rb")
            raw.seek(base)
            tar_file = tarfile.open(fileobj=raw, mode="r|")
        else:
            tar_file = tarfile.open(path, "r|*")
        with tar_file as tar:
            for member in tar:
                offset = base + member.offset
                if offset < start or not member.isfile():
                    continue
                match = _KEY_EXT.match(member.name)
                if match is None:
                    continue
                key, ext = match.groups()
                data = tar.extractfile(member).read()
                if current is not None and (current["__key__"] != key or ext in current):
                    yield current_offset, offset, current
                    current = None
                if current is None:
                    current, current_offset = {"__key__": key}, offset
                current[ext] = data
            end = base + tar.offset
        if proc is not None:
            proc.stdout.close()
            if proc.wait() != 0:
                raise ShardError(f"{path}: the command exited with {proc.returncode}{_last_line(errors)}")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        said = ""
        if proc is not None:
            proc.wait()
            said = _last_line(errors)
        raise ShardError(f"{path}: {type(e).__name__}: {e}{said}") from None
    finally:
        if proc is not None and proc.poll() is None:  # the reader stopped early
            proc.kill()
            proc.wait()
        if errors is not None:
            errors.close()
        if raw is not None:
            raw.close()
    # tarfile takes a header cut short for the end of the archive; a whole tar
    # ends with two zero blocks after its last member.
    if command is None and path.endswith(".tar") and os.path.getsize(path) < end + 2 * tarfile.BLOCKSIZE:
        raise ShardError(f"{path}: truncated (no end-of-archive marker)")
    if current is not None:
        yield current_offset, end, current


def read_samples_at(path: str | Path, offsets: Iterable[int]) -> dict[int, dict]:
    """{offset: sample} of the samples whose first member's header is at each of `offsets`
    (read_shard_from's offsets). A tar file is entered at each offset; a pipe or a compressed
    tar is read once, from the first offset to the last."""
    wanted = sorted(set(offsets))
    found: dict[int, dict] = {}
    if wanted and _seekable(str(path)):
        for offset in wanted:
            for start, _, sample in read_shard_from(path, offset):
                found[start] = sample
                break
    elif wanted:
        for start, _, sample in read_shard_from(path, wanted[0]):
            if start in wanted:
                found[start] = sample
            if start >= wanted[-1]:
                break
    missing = [offset for offset in wanted if offset not in found]
    if missing:
        raise ShardError(f"{path}: no sample at offset {missing[0]}")
    return found
