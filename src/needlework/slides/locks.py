"""Per-slide lock files, so several workers or machines can share one job folder.

``<slide_id>.lock`` is created with ``O_EXCL`` and holds ``{"pid", "host", "start", "time"}``. A lock is
taken over when its owner is known to be gone:

* same host and the process ``pid`` no longer runs (or runs but started at another time: a reused pid) —
  the case of a worker killed with ``kill -9``, which never gets to remove its lock;
* any host, and the lock is older than ``stale_after`` seconds (owners on other machines cannot be asked);
* the lock is empty or unreadable and older than ``EMPTY_GRACE`` seconds (the owner died between creating
  and filling it).

Breaking a lock is itself guarded by ``<slide_id>.lock.break`` (``O_EXCL``), and the lock is re-read under
that guard, so two workers that both find the same dead lock cannot both delete it and both win.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

EMPTY_GRACE = 30.0  # seconds an empty lock file is given to be filled by its creator
BREAK_GRACE = 60.0  # a leftover break guard older than this is removed


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing one.
    return stat.rsplit(")", 1)[-1].split()[19]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(path: str | Path) -> dict[str, Any] | None:
    """The owner record of a lock file (None when missing, empty or unreadable)."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe_owner(info: dict[str, Any] | None) -> str:
    if not info:
        return "unknown owner"
    return f"pid {info.get('pid')} on {info.get('host')}"


class SlideLock:
    """``<slide_id>.lock`` created with ``O_EXCL``; see the module docstring for when it is taken over.

    Attributes:
        path: the lock file.
        stale_after: age in seconds after which a lock of a live or remote owner counts as abandoned.
        taken_over: owner record of the dead lock this one replaced (None if it was free).
    """

    def __init__(self, path: str | Path, stale_after: float = 6 * 3600):
        self.path = Path(path)
        self.stale_after = stale_after
        self.held = False
        self.taken_over: dict[str, Any] | None = None

    def _abandoned(self) -> tuple[bool, dict[str, Any] | None, float | None]:
        """(abandoned?, owner record, mtime) of the current lock file; mtime None when it is gone."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return False, None, None
        age = time.time() - mtime
        info = read_lock(self.path)
        if info is None:
            return age > EMPTY_GRACE or age > self.stale_after, None, mtime
        if age > self.stale_after:
            return True, info, mtime
        if info.get("host") == socket.gethostname():
            pid = int(info.get("pid", -1))
            if not pid_alive(pid):
                return True, info, mtime
            start = info.get("start")
            if start is not None and _process_start(pid) not in (None, start):
                return True, info, mtime  # the pid now belongs to another process
        return False, info, mtime

    def _break(self) -> bool:
        """Remove an abandoned lock under the break guard; True when the lock file is gone."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > BREAK_GRACE:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            # Re-check under the guard: another worker may have broken it and taken it already.
            abandoned, info, mtime = self._abandoned()
            if mtime is None:
                return True
            if not abandoned:
                return False
            self.path.unlink(missing_ok=True)
            self.taken_over = info or {}
            return True
        finally:
            guard.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Take the lock; False when a live owner holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                abandoned, _, mtime = self._abandoned()
                if mtime is not None and not (abandoned and self._break()):
                    return False
                continue
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "start": _process_start(os.getpid()),
                "time": time.time(),
            }
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            self.held = True
            return True
        return False

    def owner(self) -> str:
        """Who holds the lock now, in words (for "busy" messages)."""
        return describe_owner(read_lock(self.path))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
