"""Guards of a directory a command writes (``qflax train --workdir``, ``qflax ptq --out``): the
checks that refuse a bad path before anything is touched, and one writer at a time.

* :func:`check_output_dir`: an empty path, an existing file, an unwritable place;
* :func:`check_run_dir`: a non-empty folder that holds no qflax run (nothing of the user's is
  overwritten);
* :func:`lock_dir`: an exclusive ``fcntl.flock`` on ``DIR/.lock`` for as long as the command
  writes; the file names the holder (pid, host, start time, command) for the error a second
  writer gets. The kernel releases the lock when its process dies, so a lock file left behind by
  a killed run is taken over (with a logged warning naming the old holder).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import time
from collections.abc import Iterator

__all__ = ["LOCK_FILE", "DirInUseError", "check_output_dir", "check_run_dir", "lock_dir"]

LOCK_FILE = ".lock"

logger = logging.getLogger("qflax.runs")

# What marks a folder as a qflax run (besides a config.json holding a qflax config).
_RUN_MARKERS = ("checkpoints", "metrics.jsonl")
# Keys every config.json written by `qflax train` has.
_CONFIG_MARKERS = ("dataset", "model", "epochs", "quant")


class DirInUseError(ValueError):
    """Another process holds the lock of the directory; the message names it."""


def check_output_dir(path: str | os.PathLike, *, option: str = "workdir") -> pathlib.Path:
    """``path`` as a ``Path`` once it can be a directory this process writes.

    Raises:
      ValueError: ``path`` is empty (or whitespace: ``Path("")`` would be the current
        directory), an existing file, or a directory (or the nearest existing parent of a new
        one) that this process cannot write.
    """
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"{option}={path!r} is empty; allowed: a directory path")
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}={str(path)!r} is an existing file; allowed: a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option}={str(path)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its parent {str(existing)!r} is not)"
        raise ValueError(
            f"{option}={str(path)!r} is not writable{where}; allowed: a directory you can write"
        )
    return path


def _is_qflax_config(path: pathlib.Path) -> bool:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(values, dict) and all(key in values for key in _CONFIG_MARKERS)


def check_run_dir(path: pathlib.Path, config_file: str = "config.json") -> None:
    """Refuses a non-empty folder that holds no qflax run.

    A qflax run: its ``config.json`` is a qflax config (dataset, model, epochs, quant); without
    a ``config.json``, it has ``checkpoints/`` or ``metrics.jsonl``. A missing or empty folder
    (the lock file aside) is a new run. A ``config.json`` of anything else is never overwritten.
    """
    if not path.is_dir():
        return
    names = {p.name for p in path.iterdir()} - {LOCK_FILE}
    if not names:
        return
    if config_file in names:
        if _is_qflax_config(path / config_file):
            return
        reason = f"its {config_file} is not a qflax config"
    elif any(marker in names for marker in _RUN_MARKERS):
        return
    else:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        reason = f"it holds only other entries: {shown}"
    raise ValueError(
        f"workdir {str(path)!r} is not empty and holds no qflax run ({reason}); allowed: a new "
        "or empty directory, or the workdir of a qflax run to resume"
    )


def _holder(fd: int) -> dict:
    """The holder recorded in an open lock file ({} when there is none or it is unreadable)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        holder = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not written its details yet"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
        f"({holder.get('command')})"
    )


def _is_running(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command() -> str:
    """This process's command line, ``qflax train ...`` for the CLI."""
    argv = list(sys.argv)
    if argv and pathlib.Path(argv[0]).name in ("qflax", "cli.py", "__main__.py"):
        argv[0] = "qflax"
    return shlex.join(argv)


@contextlib.contextmanager
def lock_dir(
    path: str | os.PathLike, *, option: str = "workdir", command: str | None = None
) -> Iterator[None]:
    """Holds the exclusive lock of the existing directory ``path`` (``path/.lock``).

    The lock is per directory (a run's ``teacher/`` run takes its own) and per open file, so a
    second ``lock_dir`` of the same directory fails in the same process too. On exit the file
    is emptied (and kept: removing it would let a waiting opener lock a deleted inode).

    Raises:
      DirInUseError: another process (or another ``lock_dir`` here) holds it; names the holder.
    """
    path = pathlib.Path(path)
    lock_path = path / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            for _ in range(10):  # the holder may be writing its details just now
                if holder:
                    break
                time.sleep(0.05)
                holder = _holder(fd)
            raise DirInUseError(
                f"{option} {str(path)!r} is in use by another qflax run: {_describe(holder)}; "
                f"wait for it to finish or stop it (lock: {lock_path})"
            ) from None
        previous = _holder(fd)
        host = socket.gethostname()
        if previous:
            same_host = previous.get("host") == host
            state = (
                "is no longer running"
                if same_host and not _is_running(previous.get("pid"))
                else "no longer holds it"
            )
            logger.warning(
                "%s: taking over the lock left by %s, which %s", path, _describe(previous), state
            )
        holder = {
            "pid": os.getpid(),
            "host": host,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command or _command(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
