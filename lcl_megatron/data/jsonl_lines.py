"""Lines of `.jsonl` and `.jsonl.zip` files, read as far as the bytes allow.

A zip cut short loses its central directory, so `zipfile` refuses the whole
file; its members' local headers and compressed data are still at the front,
so the fallback decompresses them in order until the data ends. Damage stops
the reading of that file only and is counted, never raised.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections import Counter
from typing import Iterator

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CHUNK = 1 << 20


def read_lines(path: str, stats: Counter) -> Iterator[bytes]:
    """Yield the lines (without line ends) of a .jsonl or .jsonl.zip file.

    Counts `files_unreadable` (cannot be opened at all) and `files_truncated`
    (read up to damage; the lines before it were yielded).
    """
    try:
        if path.endswith(".zip"):
            yield from _zip_lines(path, stats)
        else:
            with open(path, "rb") as f:
                for line in f:
                    yield line.rstrip(b"\r\n")
    except OSError:
        stats["files_unreadable"] += 1


def _zip_lines(path: str, stats: Counter) -> Iterator[bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        stats["files_truncated"] += 1
        yield from _local_header_lines(path)
        return
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            try:
                with archive.open(info) as member:
                    for line in member:
                        yield line.rstrip(b"\r\n")
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
                stats["files_truncated"] += 1
                return


def _local_header_lines(path: str) -> Iterator[bytes]:
    """Members of a zip without its central directory, decompressed in file order until the bytes end."""
    with open(path, "rb") as f:
        while True:
            header = f.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or not header.startswith(_LOCAL_SIGNATURE):
                return
            _, _, flags, method, _, _, _, compressed_size, _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            name = f.read(name_length)
            f.read(extra_length)
            if method not in (0, 8):
                return
            size_known = not flags & 0x08
            if name.endswith(b"/"):
                f.seek(compressed_size, 1)
                continue
            decompressor = zlib.decompressobj(-15) if method == 8 else None
            remaining = compressed_size if size_known else None
            pending = b""
            finished = False
            while not finished:
                want = _CHUNK if remaining is None else min(_CHUNK, remaining)
                chunk = f.read(want) if want else b""
                if remaining is not None:
                    remaining -= len(chunk)
                if decompressor is not None:
                    try:
                        data = decompressor.decompress(chunk)
                    except zlib.error:
                        data, finished = b"", True
                    if decompressor.eof:
                        finished = True
                        f.seek(-len(decompressor.unused_data), 1)
                else:
                    data = chunk
                    finished = remaining == 0
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r")
                if not chunk and (decompressor is None or not decompressor.eof):
                    if pending:
                        yield pending  # possibly cut mid-line; the JSON parser decides
                    return
            if pending:
                yield pending
            if not size_known:  # a data descriptor follows, with or without its signature
                f.read(12 if f.read(4) == b"PK\x07\x08" else 8)
