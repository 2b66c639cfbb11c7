"""Lock files: a lock whose owner died on this host is taken over; a live owner keeps its slide."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from needlework.slides.status import SlideLock


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(path, pid, host=None, age=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "time": time.time()}))
    if age:
        t = time.time() - age
        os.utime(path, (t, t))


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    lock_path = tmp_path / "slide.lock"
    _write_lock(lock_path, _dead_pid())
    lock = SlideLock(lock_path)
    assert lock.acquire(), "a fresh lock whose process is dead must be taken over"
    assert json.loads(lock_path.read_text())["pid"] != 0
    lock.release()
    assert not lock_path.exists()


def test_lock_of_a_live_process_or_another_host_is_respected(tmp_path):
    live = tmp_path / "live.lock"
    _write_lock(live, os.getppid())  # our parent is alive
    assert not SlideLock(live).acquire()
    remote = tmp_path / "remote.lock"
    _write_lock(remote, _dead_pid(), host="another-machine.invalid")
    assert not SlideLock(remote).acquire(), "a pid on another host cannot be checked: wait for stale_after"
    assert SlideLock(remote, stale_after=0.0).acquire()


def test_empty_lock_is_given_time_then_taken_over(tmp_path):
    empty = tmp_path / "empty.lock"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("")
    assert not SlideLock(empty).acquire()  # its creator may be about to fill it
    t = time.time() - 120
    os.utime(empty, (t, t))
    assert SlideLock(empty).acquire()


def test_only_one_of_many_racing_workers_takes_a_dead_lock(tmp_path):
    """8 processes try to take the same dead lock at once: exactly one wins."""
    lock_path = tmp_path / "race.lock"
    _write_lock(lock_path, _dead_pid())
    code = (
        "import sys, time; from needlework.slides.status import SlideLock\n"
        "l = SlideLock(sys.argv[1]); ok = l.acquire(); print(int(ok)); sys.stdout.flush(); time.sleep(1.5)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(lock_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    wins = sum(int(p.communicate(timeout=60)[0].strip() or 0) for p in procs)
    assert wins == 1
