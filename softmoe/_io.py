"""Atomic file writes: everything softmoe saves goes through here, so a crash or a full disk
leaves either the old file or the whole new one, never a partial one; output paths checked
before the work that fills them. And where its caches live."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable


def user_cache_dir(name: str, env: str) -> Path:
    """The folder softmoe caches `name` in: `$<env>` if set, else
    `$XDG_CACHE_HOME/softmoe/<name>` (default `~/.cache/softmoe/<name>`)."""
    override = os.environ.get(env)
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softmoe" / name


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path` (its folder is created), fsync it,
    then rename it over `path`. The temp file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> Path:
    dump_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def _probe_writable(path: Path, folder: Path, arg: str) -> None:
    """PermissionError naming `arg` and `path` unless a file can be created in the nearest
    existing folder at or above `folder` (where the missing folders would be made)."""
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{arg} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{arg} {str(path)!r}: cannot write in {str(folder)!r}: {e.strerror or e}") from e


def check_output_file(path: str | os.PathLike, arg: str) -> Path:
    """Check, before any work, that `atomic_write(path, ...)` can succeed later: `path` is not
    a folder and a file can be written where it goes. Nothing is created. ValueError /
    PermissionError naming `arg` (e.g. "--json") otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'results.json')!r}")
    _probe_writable(path, path.parent, arg)
    return path


def check_output_dir(path: str | os.PathLike, arg: str) -> Path:
    """Check, before any work, that files can be written into folder `path` later: it is a
    folder or does not exist yet, and it (or the folder it would be made in) is writable.
    Nothing is created. ValueError / PermissionError naming `arg` (e.g. "--out") otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is a file; give a folder (it is created if missing)")
    _probe_writable(path, path, arg)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
