"""Exclusive ownership of a file path while a process writes what it guards: one writer per
(teacher, shard), one process creating a store's metadata at a time.

    with FileLock(store / ".partial" / "teacher-a" / "shard-00003.lock", "teacher-a shard-00003", on_busy="fail"):
        ...   # only this process writes shard 3 of teacher-a

An `flock` on the lock file, held for the whole block, plus an owner record (host, pid, start
time) written into the file so a refused second writer can name the first. The kernel (or, on
a network file system, the lock server) drops the lock when its owner dies: kill -9, OOM or a
lost node never leaves a shard locked forever, and no stale-lock heuristics (timeouts, pid
probing across hosts) are needed.

The holder unlinks the lock file before it lets go, so a finished shard leaves no file behind;
a waiter that then wins the lock on the unlinked inode sees that the path no longer names its
file and starts over on the new one (the usual unlink-safe flock protocol).

File systems (README, "Concurrent dump tasks"): safe on local file systems, on NFSv4 (Linux
maps flock onto NFSv4 byte-range locks; a dead client's locks go when its lease expires,
~90 s by default), on Lustre mounted with `-o flock` (the default on current releases;
`-o localflock` only excludes writers on one node) and on GPFS / Spectrum Scale. Where the file
system refuses locks (ENOLCK, EOPNOTSUPP: NFSv3 without lockd, Lustre `-o noflock`) the writer
stops with an error instead of writing unguarded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Literal

from .errors import ShardBusy, StoreError

__all__ = ["FileLock", "lock_holder"]

log = logging.getLogger(__name__)
_HELD: set[str] = set()  # paths this process holds: a second FileLock on one of them in this process is busy too


def lock_holder(path: str | Path) -> str | None:
    """Who holds the lock at `path` now (host, pid, start), or None: nobody, or no such file.
    Read-only: creates nothing (status checks run on read-only stores too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return FileLock(path, str(path)).owner()
        raise
    finally:
        os.close(fd)  # drops the shared lock we may have taken
    return None


class FileLock:
    """flock-based exclusive lock on `path` (created with its parent folders); `what` names the
    guarded thing in messages. on_busy: "fail" raises ShardBusy naming the owner; "wait" polls
    every `poll` seconds until the owner finishes or dies."""

    def __init__(
        self,
        path: str | Path,
        what: str,
        on_busy: Literal["fail", "wait"] = "fail",
        poll: float = 0.5,
        quiet: bool = False,
        fix: str = "wait for it to finish, or run with --on-busy wait",
    ) -> None:
        self.fix = fix  # the busy message's advice
        if on_busy not in ("fail", "wait"):
            raise ValueError(f"on_busy: 'fail' or 'wait', got {on_busy!r}")
        self.path, self.what, self.on_busy, self.poll = Path(path).absolute(), what, on_busy, poll
        self.fd: int | None = None
        self.quiet = quiet  # a wait that is routine and short (the store's metadata): not worth a warning

    def owner(self) -> str:
        """The owner record of the current lock file, as words (best effort: it may be mid-write)."""
        try:
            rec = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            rec = {}
        if not rec:
            return "another process (owner not recorded yet)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("start", 0)))
        return f"pid {rec.get('pid')} on host {rec.get('host')}, started {started}"

    def _try(self) -> bool:
        """One attempt: True with the lock held on the file the path names now."""
        for _ in range(50):  # the folder may be removed by a finishing holder between mkdir and open
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                break
            except FileNotFoundError:
                continue
        else:
            raise StoreError(f"cannot create lock file {self.path}: its folder keeps disappearing")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise StoreError(
                    f"{self.path}: the file system refuses file locks ({os.strerror(e.errno)}), so two tasks writing "
                    f"{self.what} could not be kept apart; put the store on a file system with locking (local, NFSv4, "
                    "Lustre mounted with -o flock, GPFS)"
                ) from e
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder we waited for unlinked this file: lock the new one
            os.close(fd)
            return self._try()
        self.fd = fd
        return True

    def acquire(self) -> FileLock:
        key = str(self.path)
        waited = False
        while True:
            if key not in _HELD and self._try():
                break
            if self.on_busy == "fail":
                raise ShardBusy(f"{self.what} is being written by {self.owner()} (lock {self.path}); {self.fix}")
            if not waited:
                log.log(
                    logging.DEBUG if self.quiet else logging.WARNING,
                    "%s is being written by %s; waiting (--on-busy wait)",
                    self.what,
                    self.owner(),
                )
                waited = True
            time.sleep(self.poll)
        _HELD.add(key)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)
        return self

    def release(self, unlink: bool = True) -> None:
        """Let go; unlink the lock file first (while still holding it) unless told not to."""
        if self.fd is None:
            return
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        _HELD.discard(str(self.path))
        os.close(self.fd)  # closing the only descriptor drops the flock
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
