"""Where a convert command may write: never over something the user had.

Every `lcl convert` command that writes (`to-hf`, `from-openclip`,
`to-openclip`, `reshard`) calls `check_output` before any heavy work. An
output path is taken only if it is absent, an empty directory, or an earlier
output of the same command that nobody has changed since; `--force` replaces
anything else except the command's own input. A command records what it wrote
in a small marker (`.lcl-convert.json` inside a directory it wrote; beside a
file it wrote, `.NAME.lcl-convert.json` with the file's SHA-256), which is how
a later run recognises its own output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lcl_megatron.checkpoint.consolidated import CheckpointMismatch
from lcl_megatron.checkpoint.format import sha256_file
from lcl_megatron.config import ConfigError
from lcl_megatron.errors import UserError
from lcl_megatron.utils import atomic_write_text, follow_umask

MARKER = ".lcl-convert.json"


class OutputRefused(UserError, ValueError):
    """An output path the command will not write to: one line, exit code 2."""


def file_marker(path: Path) -> Path:
    return path.parent / f".{path.name}{MARKER}"


def _read_marker(path: Path) -> dict:
    try:
        marker = json.loads(path.read_text())
        return marker if isinstance(marker, dict) else {}
    except (OSError, ValueError):
        return {}


def _listing(names, limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_writable_place(out: Path) -> None:
    """The directory the output will be created in must take new files (tried, since
    permission bits say nothing to root, nor on a read-only mount)."""
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise OutputRefused(f"--out '{out}' lies under '{parent}', which is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise OutputRefused(f"--out '{out}': cannot write in '{parent}' ({e.strerror or e})") from None


def _overlaps(out: Path, inputs) -> Path | None:
    """An input that replacing `out` would delete or change: `out` is it, holds it, or is a
    file or folder already inside it."""
    real_out = out.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if real == real_out or real_out in real.parents or (real in real_out.parents and os.path.lexists(out)):
            return Path(source)
    return None


def check_output(out: Path, command: str, *, is_dir: bool, force: bool, inputs=()) -> None:
    """Raise OutputRefused unless `command` (e.g. 'lcl convert to-hf') may write `out`.

    `is_dir`: the command writes a directory (else one file). `inputs`: paths the
    command reads, which no output may replace, even with --force."""
    out = Path(out)
    source = _overlaps(out, inputs)
    if source is not None:
        raise OutputRefused(f"--out '{out}' would replace the input '{source}'; choose another --out")
    _check_writable_place(out)
    if not os.path.lexists(out):
        return
    retry = "choose another --out, or pass --force to replace it"
    if not is_dir:
        if out.is_dir():
            raise OutputRefused(f"--out '{out}' is a directory; give the path of the file to write")
        marker = _read_marker(file_marker(out))
        if force or (marker.get("command") == command and marker.get("sha256") == sha256_file(out)):
            return
        raise OutputRefused(f"--out '{out}' is a file that {command} did not write, or was changed since; {retry}")
    if not out.is_dir():
        if force:
            return
        raise OutputRefused(f"--out '{out}' is a file, not a directory; {retry}")
    present = {p.name for p in out.iterdir()}
    if not present or force:
        return
    marker = _read_marker(out / MARKER)
    if marker.get("command") != command:
        raise OutputRefused(f"--out '{out}' already holds files that {command} did not write "
                            f"({_listing(present)}); {retry}")
    added = present - set(marker.get("files", [])) - {MARKER}
    if added:
        raise OutputRefused(f"--out '{out}' holds files that {command} did not write ({_listing(added)}); {retry}")


def mark_directory(directory: Path, command: str) -> None:
    """Record, inside a directory about to be published, which command wrote it and which files."""
    files = sorted(p.name for p in Path(directory).iterdir() if p.name != MARKER)
    atomic_write_text(Path(directory) / MARKER, json.dumps({"command": command, "files": files}, indent=1) + "\n")


@contextlib.contextmanager
def atomic_directory(out: Path, written_by: str):
    """Yield a temporary sibling directory to fill; on success it replaces `out` in one rename.

    A crash or an error leaves `out` as it was (an old `out` is only removed after the swap).
    `written_by` (the command) is recorded inside, so a later run knows the folder as its own;
    callers check `out` with `check_output` first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    follow_umask(tmp)
    try:
        yield tmp
        mark_directory(tmp, written_by)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mark_file(path: Path, command: str) -> None:
    atomic_write_text(file_marker(Path(path)), json.dumps({"command": command, "sha256": sha256_file(Path(path))}) + "\n")


def add_output_flags(parser, what: str) -> None:
    """--out and --force, worded the same for every convert command."""
    parser.add_argument("--out", required=True,
                        help=f"{what}; must be absent, an empty directory, or an earlier output of this command")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it holds other files (never the command's own input)")


def write_guarded(command: str, args, write, errors=()) -> Path | None:
    """Check `args.out` (a directory) against `args.checkpoint`, then `write()`; print where it
    wrote, or one line on stderr and return None for a refusal or bad input (exit code 2)."""
    try:
        check_output(Path(args.out), command, is_dir=True, force=args.force, inputs=[args.checkpoint])
        out = write()
    except (ConfigError, CheckpointMismatch, OutputRefused, FileNotFoundError, *errors) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return None
    print(f"wrote {out}")
    return out
