"""Where a run's artifacts live: a local directory, or a URI that every node can reach.

A URI run directory (`s3://`, `gs://`, or any `pyarrow.fs` URI, with pyarrow's query
options such as `?endpoint_override=host:port`) is worked on through a mirror in this
node's Ray temp dir. Stages write into the mirror; each manifest record uploads the
stage's outputs and then the manifest, so the manifest is the commit point (object
stores cannot rename a directory atomically, and a file the manifest does not list is
never trusted). A run started anywhere brings the mirror up to date from the URI first.

Ray workers and actors are given `RunPath`s, not local paths: each fetches what it reads
into its own node's cache, which on the driver's node is the driver's mirror itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dem_ray.core.atomic import atomic_file
from dem_ray.run.console import emit

log = logging.getLogger(__name__)

CACHE_ENV = "DEM_RAY_CACHE_DIR"
_CHUNK = 8 << 20


class StorageError(RuntimeError):
    """The run directory's URI cannot be used; the message says what to check."""


def is_uri(location: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def ray_temp_dir() -> Path:
    """Ray's temp dir on this node, found the way Ray finds it (RAY_TMPDIR, TMPDIR, /tmp)."""
    if "RAY_TMPDIR" in os.environ:
        root = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        root = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        root = "/tmp"
    else:
        root = tempfile.gettempdir()
    return Path(root) / "ray"


def cache_dir() -> Path:
    """Where this node keeps mirrors of URI run directories ($DEM_RAY_CACHE_DIR overrides)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else ray_temp_dir() / "dem_ray_cache"


def _strip_query(location: str) -> str:
    """The URI without its query: options there may hold credentials, never logged."""
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


@dataclass(frozen=True)
class RunPath:
    """A path inside a URI run directory, as handed to workers on any node."""

    run_dir: str
    rel: str

    def __str__(self) -> str:
        return f"{_strip_query(self.run_dir)}/{self.rel}"


class RunStorage:
    """A run directory: `local` is where stages read and write on this node."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.fs = None
        self.root = ""
        if not is_uri(location):
            self.local = Path(location).expanduser().resolve()
            self.display = str(self.local)
            return
        import pyarrow.fs as pafs

        self.display = _strip_query(location)
        try:
            self.fs, root = pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
            raise StorageError(
                f"run_dir {self.display}: pyarrow cannot open this URI ({exc}); use s3://BUCKET/"
                "PATH, gs://BUCKET/PATH or another pyarrow.fs URI (options go in the query, "
                "e.g. ?endpoint_override=HOST:PORT&scheme=http)"
            ) from exc
        self.root = root.rstrip("/")
        key = hashlib.sha256(self.display.encode()).hexdigest()[:16]
        tail = re.sub(r"[^A-Za-z0-9._-]", "_", self.display.rsplit("/", 1)[-1]) or "run"
        self.local = cache_dir() / f"{tail}-{key}"

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def __str__(self) -> str:
        return self.display

    def show(self, path: Path) -> str:
        """How to name a local path of this run to a user: its URI when the run has one."""
        if not self.remote or not Path(path).is_relative_to(self.local):
            return str(path)
        rel = self._rel(path)
        return self.display if rel == "." else f"{self.display}/{rel}"

    def ref(self, path: Path) -> str | RunPath:
        """What a worker on another node needs to read `path`."""
        path = Path(path)
        if not self.remote or not path.is_relative_to(self.local):
            return str(path)
        return RunPath(self.location, self._rel(path))

    def ray_storage(self, name: str) -> tuple[str, object]:
        """`storage_path` and `storage_filesystem` for a Ray Train/Tune run's RunConfig."""
        if not self.remote:
            return str(self.local / name), None
        return f"{self.root}/{name}", self.fs

    # ---- checks -------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write and delete a probe object, so bad credentials fail before any work."""
        import pyarrow.fs as pafs

        probe = f"{self.root}/.write-probe.{os.getpid()}"
        try:
            with self.fs.open_output_stream(probe) as fh:
                fh.write(b"dem-ray write probe\n")
            self.fs.delete_file(probe)
            info = self.fs.get_file_info(self.root)
            if info.type == pafs.FileType.File:
                raise OSError(f"{self.display} is a file, not a directory")
        except OSError as exc:
            raise StorageError(
                f"run_dir {self.display} is not writable ({exc}); check that the bucket "
                "exists, that this node's credentials may write it (AWS_* / "
                "GOOGLE_APPLICATION_CREDENTIALS), and the endpoint in the URI's query"
            ) from exc

    # ---- transfers ------------------------------------------------------------------------
    def remote_files(self, rel: str = "") -> dict[str, tuple[int, int]]:
        """{path relative to the run: (size, mtime_ns)} of the files under `rel`."""
        import pyarrow.fs as pafs

        base = f"{self.root}/{rel}".rstrip("/")
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return {rel: (info.size, _mtime_ns(info))}
        if info.type != pafs.FileType.Directory:
            return {}
        found = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return {
            f.path[len(self.root) + 1 :]: (f.size, _mtime_ns(f))
            for f in found
            if f.type == pafs.FileType.File
        }

    def pull(self, rel: str = "", exact: bool = False) -> int:
        """Bring the local copy of `rel` (a file or a directory) up to date; files fetched.

        A local file counts as current when its size and mtime are the remote object's
        (downloads and uploads set the local mtime to the remote one). `exact`: also
        delete local files the remote does not have, so the remote is the only truth
        (a manifest left in the mirror must not vouch for outputs the bucket lost).
        """
        if not self.remote:
            return 0

        def skipped(name: str) -> bool:  # temp files and markers (a lock) are never pulled
            return any(p.startswith(".") for p in name.split("/"))

        remote = {n: v for n, v in self.remote_files(rel).items() if not skipped(n)}
        if exact and (self.local / rel).is_dir():
            for path in (self.local / rel).rglob("*"):
                name = path.relative_to(self.local).as_posix()
                if path.is_file() and not skipped(name) and name not in remote:
                    log.info("storage: %s is not in %s; removed from the mirror", name,
                             self.display)  # fmt: skip
                    path.unlink()
        todo = [
            (n, s, m) for n, (s, m) in sorted(remote.items()) if not _same(self.local / n, s, m)
        ]
        progress = _DownloadProgress(rel or "the run", sum(size for _, size, _ in todo))
        for name, _, mtime in todo:
            self._download(name, self.local / name, mtime, progress)
        progress.finish()
        fetched = len(todo)
        if fetched:
            log.info("storage: fetched %d file(s) of %s from %s", fetched, rel or "the run",
                     self.display)  # fmt: skip
        return fetched

    def push(self, paths: Iterable[Path]) -> None:
        """Upload files and directories; remote files under an uploaded directory that
        are gone locally are deleted, so the remote directory is the local one."""
        if not self.remote:
            return
        for path in paths:
            local = {self._rel(p): p for p in files_under(Path(path))}
            if Path(path).is_dir():
                for stale in set(self.remote_files(self._rel(path))) - set(local):
                    self.fs.delete_file(f"{self.root}/{stale}")
            for name, p in local.items():
                self._upload(p, name)

    def delete(self, path: Path) -> None:
        """Remove a directory's remote copy (the local one is the caller's)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return
        target = f"{self.root}/{self._rel(path)}"
        if self.fs.get_file_info(target).type == pafs.FileType.Directory:
            self.fs.delete_dir(target)

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.local).as_posix()

    def _upload(self, path: Path, rel: str) -> None:
        target = f"{self.root}/{rel}"
        with path.open("rb") as src, self.fs.open_output_stream(target) as dst:
            for block in iter(lambda: src.read(_CHUNK), b""):
                dst.write(block)
        mtime = _mtime_ns(self.fs.get_file_info(target))
        if mtime is not None:  # the local copy now counts as current (see `pull`)
            os.utime(path, ns=(mtime, mtime))

    def _download(
        self, rel: str, local: Path, mtime: int | None, progress: _DownloadProgress | None = None
    ) -> None:
        with (
            atomic_file(local, "wb") as dst,
            self.fs.open_input_stream(f"{self.root}/{rel}") as src,
        ):
            for block in iter(lambda: src.read(_CHUNK), b""):
                dst.write(block)
                if progress is not None:
                    progress.add(len(block))
        if mtime is not None:
            os.utime(local, ns=(mtime, mtime))


class _DownloadProgress:
    """Bytes fetched of a pull, as console events (a bar on a terminal), for pulls large
    enough to wait on; at most one event per EVENT_BYTES, so a worker's pull
    adds a few lines to its log stream, not one per chunk."""

    MIN_BYTES = 16 << 20
    EVENT_BYTES = 64 << 20  # between two events (a worker's go through its log stream)

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.shown = name, total, 0, 0
        self.on = total >= self.MIN_BYTES

    def add(self, n: int) -> None:
        self.done += n
        if self.on and self.done - self.shown >= self.EVENT_BYTES:
            self._emit()

    def finish(self) -> None:
        if self.on and self.shown < self.done:
            self._emit()

    def _emit(self) -> None:
        self.shown = self.done
        emit("download", name=self.name, done=self.done, total=self.total, logger=__name__)


def _mtime_ns(info) -> int | None:
    return info.mtime_ns if info.mtime is not None else None


def _same(local: Path, size: int, mtime: int | None) -> bool:
    try:
        stat = local.stat()
    except FileNotFoundError:
        return False
    return stat.st_size == size and (mtime is None or stat.st_mtime_ns == mtime)


def files_under(path: Path) -> list[Path]:
    """The files a manifest record lists for an output: itself, or those under it
    (names starting with '.' are temp files and markers, never outputs)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


_OPENED: dict[str, RunStorage] = {}


def fetch(path: str | RunPath) -> Path:
    """A local path to read `path` from, on whichever node this runs (fetched if needed)."""
    if not isinstance(path, RunPath):
        return Path(path)
    storage = _OPENED.get(path.run_dir)
    if storage is None:
        storage = _OPENED[path.run_dir] = RunStorage(path.run_dir)
    storage.pull(path.rel)
    return storage.local / path.rel
