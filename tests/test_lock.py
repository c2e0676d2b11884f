"""One writer per run dir: a second command is refused at once, and a dead holder's lock
(a killed process here, an expired bucket lock elsewhere) is taken over with a warning.

Other processes are waited on through events (a line on their stdout, their exit), never
by sleeping."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import S3_CREDENTIALS

from dem_ray.run import lock as lock_module
from dem_ray.run.lock import BUCKET_LOCK_TTL_S, LOCK_NAME, RunDirBusy, RunLock, lock_ttl_s
from dem_ray.run.storage import CACHE_ENV, RunStorage

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from dem_ray.run.lock import RunLock
from dem_ray.run.storage import RunStorage
lock = RunLock(RunStorage(sys.argv[1]), command="finetune")
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""
CREDENTIALS = S3_CREDENTIALS


def start_holder(run_dir: Path) -> subprocess.Popen:
    """A child process holding the lock of `run_dir`; returns once it says so."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = child.stdout.readline()
    if line.strip() != "locked":
        child.kill()
        child.wait()
        pytest.fail(f"the holder process did not take the lock (said {line!r})")
    return child


# ---- local run dirs --------------------------------------------------------------------------
def test_a_second_writer_is_refused_while_another_process_holds_the_lock(tmp_path) -> None:
    run_dir = tmp_path / "run"
    child = start_holder(run_dir)
    try:
        lock = RunLock(RunStorage(str(run_dir)), command="run")
        with pytest.raises(RunDirBusy) as err:
            lock.acquire()
        message = str(err.value)
        assert message.startswith(f"run_dir {run_dir} is in use by pid {child.pid} on host ")
        assert f"on host {socket.gethostname()} since " in message
        assert message.endswith("(dem-ray finetune); wait for it to finish or stop it")
        assert err.value.holder["pid"] == child.pid
        holder = lock.holder()
        assert holder["pid"] == child.pid and holder["command"] == "finetune"
        assert not lock.held
    finally:
        child.stdin.close()
        assert child.wait() == 0
    assert lock.holder() is None  # released: the file is emptied, not removed
    assert (run_dir / LOCK_NAME).exists()
    lock.acquire()
    try:
        assert lock.holder()["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog) -> None:
    run_dir = tmp_path / "run"
    child = start_holder(run_dir)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    child.stdin.close()
    child.stdout.close()
    left = json.loads((run_dir / LOCK_NAME).read_text())
    assert left["pid"] == child.pid  # the record survives; the kernel dropped the flock
    lock = RunLock(RunStorage(str(run_dir)))
    assert lock.holder() is None  # a dead pid on this host holds nothing
    with caplog.at_level(logging.WARNING, logger="dem_ray.run.lock"):
        lock.acquire()
    try:
        assert (
            f"taking over the lock of run_dir {run_dir} left by pid {child.pid} "
            "(no longer running)" in caplog.text
        )
        record = json.loads((run_dir / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "run"
    finally:
        lock.release()


def test_acquire_release_acquire_in_one_process(tmp_path) -> None:
    run_dir = tmp_path / "missing" / "run"  # created on acquire
    lock = RunLock(RunStorage(str(run_dir)), command="search")
    lock.acquire()
    assert lock.held and (run_dir / LOCK_NAME).is_file()
    record = json.loads((run_dir / LOCK_NAME).read_text())
    assert set(record) >= {"pid", "host", "since", "command"}
    assert record["command"] == "search" and record["host"] == socket.gethostname()
    assert record["since"][10] == "T" and record["since"][19] in "+-Z"  # ISO, seconds, zone
    lock.acquire()  # already held by this object: nothing to do
    # Another lock object is another writer, even in this process.
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()} "):
        RunLock(RunStorage(str(run_dir))).acquire()
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and (run_dir / LOCK_NAME).read_text() == ""
    lock.acquire()
    lock.release()
    RunLock(RunStorage(str(run_dir))).release()  # never acquired: nothing to do


def test_with_releases_on_an_exception(tmp_path) -> None:
    storage = RunStorage(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="stage failed"), RunLock(storage) as lock:
        assert lock.held
        raise ValueError("stage failed")
    assert not lock.held and lock.holder() is None
    with RunLock(storage):  # free again
        pass


def test_the_ttl_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(lock_module.TTL_ENV, raising=False)
    assert lock_ttl_s() == BUCKET_LOCK_TTL_S == 600.0
    monkeypatch.setenv(lock_module.TTL_ENV, "30")
    assert lock_ttl_s() == 30.0
    for bad in ("0", "-5", "soon", "inf"):
        monkeypatch.setenv(lock_module.TTL_ENV, bad)
        with pytest.raises(ValueError, match="DEM_RAY_LOCK_TTL_S"):
            lock_ttl_s()


# ---- bucket run dirs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(s3_server):
    """Run-dir URIs in a bucket of the suite's S3 server (conftest)."""
    return s3_server("dem-ray-lock")


@pytest.fixture
def bucket(s3, tmp_path, monkeypatch):
    """A function opening a bucket run dir by name (its mirror under tmp_path)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(lock_module.TTL_ENV, raising=False)
    return lambda name: RunStorage(s3(name))


def read_object(storage: RunStorage) -> dict | None:
    try:
        with storage.fs.open_input_stream(f"{storage.root}/{LOCK_NAME}") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None


def write_object(storage: RunStorage, record: dict) -> None:
    with storage.fs.open_output_stream(f"{storage.root}/{LOCK_NAME}") as fh:
        fh.write(json.dumps(record).encode())


def test_a_held_bucket_lock_refuses_a_second_writer_and_release_deletes_it(bucket) -> None:
    first = RunLock(bucket("held"), command="run")
    first.acquire()
    try:
        record = read_object(first.storage)
        assert record["token"] == first.token and record["pid"] == os.getpid()
        assert record["expires"] > time.time()
        assert first._thread.daemon and first._thread.is_alive()
        second = RunLock(bucket("held"), command="merge")
        with pytest.raises(RunDirBusy) as err:
            second.acquire()
        assert str(err.value) == (
            f"run_dir s3://dem-ray-lock/held is in use by pid {os.getpid()} on host "
            f"{socket.gethostname()} since {record['since']} (dem-ray run); "
            "wait for it to finish or stop it"
        )
        assert second.holder()["token"] == first.token
        # The mirror never copies the lock (a dot name).
        assert first.storage.pull() == 0 and not (first.storage.local / LOCK_NAME).exists()
    finally:
        thread = first._thread
        first.release()
    assert read_object(first.storage) is None
    assert not thread.is_alive()
    first.release()  # idempotent
    with RunLock(bucket("held")) as again:
        assert read_object(again.storage)["token"] == again.token
    assert read_object(again.storage) is None


def test_an_expired_bucket_lock_is_taken_over(bucket, caplog) -> None:
    storage = bucket("expired")
    write_object(storage, {
        "pid": 4242, "host": "another-node", "since": "2020-01-01T00:00:00+00:00",
        "command": "run", "token": "theirs", "expires": time.time() - 5,
    })  # fmt: skip
    lock = RunLock(storage)
    assert lock.holder() is None
    with caplog.at_level(logging.WARNING, logger="dem_ray.run.lock"):
        lock.acquire()
    try:
        assert (
            "taking over the lock of run_dir s3://dem-ray-lock/expired held by pid 4242 on "
            "host another-node: it expired at " in caplog.text
        )
        assert "its holder stopped refreshing it" in caplog.text
        assert read_object(storage)["token"] == lock.token
    finally:
        lock.release()


def test_a_bucket_lock_of_another_node_is_respected_until_it_expires(bucket) -> None:
    storage = bucket("other-node")
    write_object(storage, {
        "pid": 4242, "host": "another-node", "since": "2020-01-01T00:00:00+00:00",
        "command": "search", "token": "theirs", "expires": time.time() + 300,
    })  # fmt: skip
    with pytest.raises(RunDirBusy, match="by pid 4242 on host another-node since 2020"):
        RunLock(storage).acquire()
    assert read_object(storage)["token"] == "theirs"  # untouched


def test_a_bucket_lock_of_a_dead_process_on_this_host_is_taken_over(
    bucket, tmp_path, caplog
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = bucket("dead-here")
    write_object(storage, {
        "pid": dead.pid, "host": socket.gethostname(), "since": "2020-01-01T00:00:00+00:00",
        "command": "run", "token": "theirs", "expires": time.time() + 300,
    })  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dem_ray.run.lock"), RunLock(storage) as lock:
        assert read_object(storage)["token"] == lock.token
    assert f"left by pid {dead.pid} (no longer running)" in caplog.text


def test_refresh_moves_the_expiry_forward_and_never_overwrites_another(bucket) -> None:
    lock = RunLock(bucket("refresh"))
    lock.acquire()
    try:
        record = read_object(lock.storage)
        write_object(lock.storage, {**record, "expires": 1.0})  # as if about to expire
        assert lock.refresh()
        assert read_object(lock.storage)["expires"] > record["expires"] - 1
        assert read_object(lock.storage)["token"] == lock.token
        # Someone took it over (we stalled past the expiry): refresh must not clobber it.
        write_object(lock.storage, {**record, "token": "theirs", "pid": 1})
        assert not lock.refresh()
        assert read_object(lock.storage)["token"] == "theirs"
    finally:
        lock.release()
    assert read_object(lock.storage)["token"] == "theirs"  # not ours: not deleted
    assert not lock.refresh()  # released: nothing to refresh


def test_the_refresher_thread_calls_refresh(bucket, monkeypatch) -> None:
    monkeypatch.setenv(lock_module.TTL_ENV, "0.2")
    lock = RunLock(bucket("thread"))
    called = threading.Event()
    real = lock.refresh

    def refresh() -> bool:
        called.set()
        return real()

    lock.refresh = refresh
    with lock:
        assert called.wait(timeout=30)
    assert read_object(lock.storage) is None


def test_two_writers_racing_for_a_bucket_lock_do_not_both_get_it(bucket, monkeypatch) -> None:
    """The read-back guard: a lock written over ours before we read it back wins."""
    storage = bucket("race")
    lock = RunLock(storage)
    rival = {
        "pid": 4242, "host": "another-node", "since": "2020-01-01T00:00:00+00:00",
        "command": "run", "token": "theirs", "expires": time.time() + 300,
    }  # fmt: skip
    monkeypatch.setattr(lock, "_settle", lambda: write_object(storage, rival))
    with pytest.raises(RunDirBusy, match="by pid 4242 on host another-node"):
        lock.acquire()
    assert not lock.held and lock._thread is None
    assert read_object(storage)["token"] == "theirs"


def test_a_command_exiting_without_release_frees_its_bucket_lock(bucket) -> None:
    """Normal interpreter exit releases (atexit), so the next command need not wait out
    the expiry; only a killed process leaves its bucket lock to expire."""
    storage = bucket("exit")
    script = (
        "import sys\n"
        "from dem_ray.run.lock import RunLock\n"
        "from dem_ray.run.storage import RunStorage\n"
        "RunLock(RunStorage(sys.argv[1])).acquire()\n"
        "print('locked', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, storage.location],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "locked\n", done.stderr[-2000:]
    assert read_object(storage) is None
