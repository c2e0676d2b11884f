"""One writer per run directory: a command that would write a run dir someone holds fails.

Two `dem-ray` commands writing the same run dir would interleave their stages and
manifest records, so each writing command holds a `RunLock` for its whole life.

Local run dir: `<run_dir>/.dem-ray.lock`, held with `flock(LOCK_EX | LOCK_NB)` on a file
descriptor kept open while the lock is held. The lock goes with the process: the kernel
drops it when the process exits, however it dies (SIGKILL included), so a lock file left
behind is only a record of who held it last, and the next command takes it over (with a
warning naming the dead pid). The file is truncated on release, never unlinked: a
process that opened the old file just before an unlink would lock a file nobody else
sees. A process forked (not exec'd) while holding the lock shares it with its child.

Bucket run dir: the object `<run_dir>/.dem-ray.lock`, a JSON record with a random token
and an `expires` time that a daemon thread pushes forward every TTL/4 while the lock is
held. Object stores offer no atomic create-if-absent through pyarrow, so taking the lock
is read, write, pause, read back and check the token: a best-effort guard that catches
two commands starting together, not a guarantee. Nothing tells a bucket that a process
on another machine was SIGKILLed: its lock is freed by expiry (`BUCKET_LOCK_TTL_S`, or
$DEM_RAY_LOCK_TTL_S), after which the next command takes it over with a warning. A lock
left by a dead process on this same host is taken over at once.

The lock is a dot name, so manifest records and mirrors never list or copy it.
"""

from __future__ import annotations

import atexit
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

from dem_ray.run.storage import RunStorage

log = logging.getLogger(__name__)

LOCK_NAME = ".dem-ray.lock"
BUCKET_LOCK_TTL_S = 600.0  # a bucket lock not refreshed for this long is free
TTL_ENV = "DEM_RAY_LOCK_TTL_S"
# Pause between writing a bucket lock and reading it back: a command that read "free" at
# the same moment as us writes within this window, and one of the two then sees the
# other's token and backs off.
SETTLE_S = 0.5


class RunDirBusy(RuntimeError):
    """Another process holds the run dir; `holder` is its lock record (may be partial)."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def lock_ttl_s() -> float:
    """The bucket lock's expiry in seconds: $DEM_RAY_LOCK_TTL_S, else `BUCKET_LOCK_TTL_S`."""
    raw = os.environ.get(TTL_ENV)
    if raw is None or raw.strip() == "":
        return BUCKET_LOCK_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl > 0 or ttl == float("inf"):
        raise ValueError(f"{TTL_ENV}={raw!r}: expected a positive number of seconds")
    return ttl


def _now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: object) -> bool:
    """Whether `pid` runs on this host (a pid we may not signal still runs)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(data: bytes) -> dict | None:
    """A lock record, or None for an empty file; a garbled one is an unknown holder."""
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


class RunLock:
    """The one-writer lock of a run dir, held from `acquire` to `release` (or a `with`)."""

    def __init__(self, storage: RunStorage, command: str = "run") -> None:
        self.storage = storage
        self.command = command
        self.ttl_s = lock_ttl_s()
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._record: dict | None = None
        self._mutex = threading.Lock()  # refresh vs release: never rewrite a released lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- where ----------------------------------------------------------------------------
    @property
    def path(self) -> Path | str:
        """The lock file (local run dir) or object path in `storage.fs` (bucket run dir)."""
        if self.storage.remote:
            return f"{self.storage.root}/{LOCK_NAME}"
        return self.storage.local / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._record is not None

    # ---- public ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock or raise `RunDirBusy` at once; a no-op if this object holds it."""
        if self.held:
            return
        if self.storage.remote:
            self._acquire_bucket()
        else:
            self._acquire_local()
        atexit.register(self.release)  # a bucket lock would otherwise wait out its expiry

    def release(self) -> None:
        """Give the lock up; safe to call any number of times."""
        if not self.held:
            return
        atexit.unregister(self.release)
        if self.storage.remote:
            self._release_bucket()
        else:
            self._release_local()

    def holder(self) -> dict | None:
        """The current holder's record ({"pid", "host", "since", "command", ...}), or None.

        Only reads: a record left by a dead process on this host, or an expired bucket
        lock, is no holder. A recycled pid can make a stale local record look held."""
        if self.held:
            return dict(self._record)
        record = self._read_bucket() if self.storage.remote else self._read_local()
        if not record:
            return None
        if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
            return None
        if self.storage.remote and _expires(record) <= time.time():
            return None
        return record

    def refresh(self) -> bool:
        """Push a held bucket lock's expiry forward (the refresher thread calls this every
        TTL/4); False if the lock is no longer ours, which is logged."""
        with self._mutex:
            if not self.held or not self.storage.remote:
                return False
            current = self._read_bucket()
            if not current or current.get("token") != self.token:
                log.error(
                    "lost the lock of run_dir %s: %s; another dem-ray command may be writing "
                    "it now",
                    self.storage.display,
                    _describe(current) if current else "the lock object is gone",
                )
                return False
            self._record["expires"] = time.time() + self.ttl_s
            self._write_bucket(self._record)
            return True

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # ---- shared ---------------------------------------------------------------------------
    def _new_record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _now_iso(),
            "command": self.command,
        }

    def _busy(self, holder: dict | None) -> RunDirBusy:
        h = holder or {}
        message = (
            f"run_dir {self.storage.display} is in use by pid {h.get('pid', '?')} on host "
            f"{h.get('host', '?')} since {h.get('since', '?')} (dem-ray {h.get('command', '?')}); "
            "wait for it to finish or stop it"
        )
        return RunDirBusy(message, holder)

    # ---- local ----------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            self._flock_or_busy(fd)
            self._warn_stale_local(_parse(_pread_all(fd)))
            record = self._new_record()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the flock if we took it
            raise
        self._fd, self._record = fd, record

    def _flock_or_busy(self, fd: int) -> None:
        """Take the flock, or raise `RunDirBusy` naming the holder. The file is empty for an
        instant after a holder takes the flock (before it writes its record) and as it
        releases (emptied, then unlocked), so an empty file is looked at again briefly."""
        record = None
        for _ in range(50):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            record = _parse(_pread_all(fd))
            if record:
                break
            time.sleep(0.01)
        raise self._busy(record)

    def _warn_stale_local(self, record: dict | None) -> None:
        if not record:
            return  # released cleanly (truncated), or never used
        pid, host = record.get("pid"), record.get("host")
        if host == socket.gethostname():
            if pid == os.getpid():
                return
            if not _pid_alive(pid):
                log.warning(
                    "taking over the lock of run_dir %s left by pid %s (no longer running)",
                    self.storage.display,
                    pid,
                )
                return
        # A live pid here that does not hold the flock is a recycled pid; on another host
        # (a shared filesystem) the flock is what counts. Either way the record is stale.
        log.warning(
            "taking over the lock of run_dir %s last held by pid %s on host %s "
            "(it no longer holds it)",
            self.storage.display,
            pid,
            host,
        )

    def _read_local(self) -> dict | None:
        try:
            return _parse(Path(self.path).read_bytes())
        except FileNotFoundError:
            return None

    def _release_local(self) -> None:
        fd, self._fd, self._record = self._fd, None, None
        try:
            os.ftruncate(fd, 0)  # while still locked: nobody reads a half-cleared record
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ---- bucket ---------------------------------------------------------------------------
    def _acquire_bucket(self) -> None:
        current = self._read_bucket()
        if current:
            expires = _expires(current)
            dead_here = current.get("host") == socket.gethostname() and not _pid_alive(
                current.get("pid")
            )
            if expires > time.time() and not dead_here:
                raise self._busy(current)
            if dead_here:
                log.warning(
                    "taking over the lock of run_dir %s left by pid %s (no longer running)",
                    self.storage.display,
                    current.get("pid"),
                )
            else:
                log.warning(
                    "taking over the lock of run_dir %s held by pid %s on host %s: it expired "
                    "at %s; its holder stopped refreshing it",
                    self.storage.display,
                    current.get("pid", "?"),
                    current.get("host", "?"),
                    _iso(expires) if expires > 0 else "?",
                )
        record = {**self._new_record(), "token": self.token, "expires": time.time() + self.ttl_s}
        self._write_bucket(record)
        self._settle()
        back = self._read_bucket()
        if not back or back.get("token") != self.token:
            raise self._busy(back)  # another command wrote its lock over ours just now
        self._record = record
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._refresh_loop, name=f"dem-ray-lock-refresh {LOCK_NAME}", daemon=True
        )
        self._thread.start()

    def _settle(self) -> None:
        time.sleep(SETTLE_S)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.refresh():
                    return
            except Exception as exc:  # a network blip: try again next time, never raise here
                log.warning(
                    "could not refresh the lock of run_dir %s: %s", self.storage.display, exc
                )

    def _release_bucket(self) -> None:
        self._stop.set()
        with self._mutex:
            self._record = None
            try:
                current = self._read_bucket()
                if current and current.get("token") == self.token:
                    self.storage.fs.delete_file(self.path)
            except OSError as exc:
                log.warning(
                    "could not delete the lock of run_dir %s (%s); it expires within %.0f s",
                    self.storage.display,
                    exc,
                    self.ttl_s,
                )
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _read_bucket(self) -> dict | None:
        try:
            with self.storage.fs.open_input_stream(self.path) as fh:
                return _parse(fh.read())
        except FileNotFoundError:
            return None

    def _write_bucket(self, record: dict) -> None:
        with self.storage.fs.open_output_stream(self.path) as fh:
            fh.write((json.dumps(record) + "\n").encode())


def _expires(record: dict) -> float:
    try:
        return float(record.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


def _describe(record: dict) -> str:
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')} "
        f"(dem-ray {record.get('command', '?')}) took it over"
    )


def _pread_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
