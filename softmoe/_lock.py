"""One run per work directory: `with workdir_lock(path):` holds `path/.softmoe.lock` for the
duration of the block, so a second `softmoe train` started in the same directory refuses at
once instead of interleaving checkpoints and metrics with the first.

The lock file is created with O_CREAT | O_EXCL (atomic on local file systems) and holds the
holder's pid, host, process start time and command line as JSON. It is removed when the block
exits, also on an exception. A process killed with SIGKILL cannot remove it: a lock whose pid
is dead on this host (or was reused by a process that started later) is stale and is taken
over. A lock held from another host is never broken automatically (its pid means nothing
here): the error names the file to delete once that run is known to be gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from collections.abc import Iterator

LOCK_NAME = ".softmoe.lock"


class WorkdirLocked(ValueError):
    """The work directory is held by another live run (a user error: `softmoe` exits 2)."""


def _start_ticks(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name in (...) may hold spaces
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    if Path("/proc/self/stat").exists():  # a zombie (dead, not yet reaped) holds nothing
        return _start_ticks(pid) is not None
    return True


def _holder(lock: Path) -> dict | None:
    """The lock file's content, or None if it vanished or is unreadable (a crash mid-write)."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _is_stale(info: dict | None, lock: Path) -> bool:
    """True if the holder is a dead process on this host (or its pid now belongs to a
    process that started after the lock was taken). An unreadable lock is stale once it
    is a minute old (a writer that crashed between create and write)."""
    if info is None:
        try:
            return time.time() - lock.stat().st_mtime > 60
        except OSError:
            return True
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if not _alive(pid):
        return True
    ticks = info.get("start_ticks")
    return isinstance(ticks, int) and _start_ticks(pid) not in (None, ticks)


def _describe(info: dict | None) -> str:
    if info is None:
        return "a process whose lock file is not readable yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')!r} (started {started}: {info.get('command', '?')})"


def _create(lock: Path, info: dict) -> bool:
    """Atomically create `lock` holding `info`; False if it already exists."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return True


def _break_stale(lock: Path, seen: dict | None) -> None:
    """Remove the stale `lock` if it still holds `seen`: it is first renamed to a name of our
    own, so that two processes breaking it at once cannot remove each other's new lock."""
    moved = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.replace(lock, moved)
    except FileNotFoundError:
        return  # another process broke it first
    if _holder(moved) == seen:
        moved.unlink(missing_ok=True)
    else:  # we moved a fresh lock taken meanwhile: put it back (fails only if yet another exists)
        with contextlib.suppress(OSError):
            os.link(moved, lock)
        moved.unlink(missing_ok=True)


@contextlib.contextmanager
def workdir_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of work directory `path` (created if needed) for the `with` block.

    Raises WorkdirLocked (a ValueError) naming the directory and the holder's pid if another
    live process holds it, PermissionError if the directory cannot be created or written."""
    workdir = Path(path)
    lock = workdir / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "start_ticks": _start_ticks(os.getpid()), "command": " ".join(sys.argv)[:500]}
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if _create(lock, info):
                break
            seen = _holder(lock)
            if not _is_stale(seen, lock):
                raise WorkdirLocked(
                    f"work directory {str(workdir)!r} is in use by another run: {_describe(seen)}. Wait for it to "
                    f"finish or use another --workdir; if that process is gone, delete {str(lock)!r}")
            _break_stale(lock, seen)
        else:
            raise WorkdirLocked(f"work directory {str(workdir)!r}: could not take {str(lock)!r} (other runs keep "
                                f"taking it)")
    except OSError as e:
        raise PermissionError(f"work directory {str(workdir)!r} is not writable: {e.strerror or e}") from e
    try:
        yield lock
    finally:
        if _holder(lock) == info:
            lock.unlink(missing_ok=True)
