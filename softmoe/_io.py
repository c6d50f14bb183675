"""Atomic file writes: everything softmoe saves goes through here, so a crash or a full disk
leaves either the old file or the whole new one, never a partial one. And where its caches live."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


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
