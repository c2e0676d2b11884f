"""The run manifest: what each stage read, wrote (with sha256) and cost.

A stage is skipped when its entry says done, its inputs hash is unchanged and
every output it recorded is still there with the same content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dem_ray.storage import RunStorage

log = logging.getLogger(__name__)


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def files_under(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, then rename over the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Manifest:
    """With a URI run's `storage`, each record uploads the stage's outputs, then the manifest
    (for a local run directory the uploads do nothing)."""

    def __init__(self, run_dir: Path, storage: RunStorage | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.storage = storage
        self.path = self.run_dir / "manifest.json"
        self._hash_cache: dict[tuple[str, int, int], str] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise RuntimeError(
                    f"{self.path}: not valid JSON ({exc}); move it away to start the run afresh"
                ) from exc
        else:
            self.data = {"version": 1, "stages": {}}

    def entry(self, key: str) -> dict | None:
        return self.data["stages"].get(key)

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hash_cache:
            self._hash_cache[key] = sha256_file(path)
        return self._hash_cache[key]

    def outputs_hash(self, key: str) -> str:
        """A digest of a finished stage's outputs, for downstream input hashes."""
        entry = self.entry(key)
        if entry is None or entry.get("status") != "done":
            raise RuntimeError(f"stage '{key}' has not run in {self.run_dir}")
        return hash_json(entry["outputs"])

    def is_done(self, key: str, inputs: str) -> bool:
        entry = self.entry(key)
        if entry is None or entry.get("status") != "done":
            return False
        if entry.get("inputs") != inputs:
            log.info("stage %s: its inputs changed since it ran", key)
            return False
        for rel, digest in entry["outputs"].items():
            path = self.run_dir / rel
            if not path.is_file():
                log.warning("stage %s: output %s is missing; running the stage again", key, path)
                return False
            if self.sha256(path) != digest:
                log.warning(
                    "stage %s: output %s differs from what the stage wrote (sha256); "
                    "running the stage again",
                    key,
                    path,
                )
                return False
        return True

    def damaged(self, key: str) -> list[tuple[Path, str]]:
        """Outputs of a finished stage that are gone or no longer what it wrote (sha256)."""
        bad = []
        for rel, digest in self.entry(key)["outputs"].items():
            path = self.run_dir / rel
            if not path.is_file():
                bad.append((path, "is missing"))
            elif self.sha256(path) != digest:
                bad.append((path, "differs from what the stage wrote (sha256): damaged"))
        return bad

    def record(
        self,
        key: str,
        inputs: str,
        outputs: list[Path],
        cost: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        if self.storage is not None:
            self.storage.push(outputs)  # before hashing: an upload sets the local mtime
        files: dict[str, str] = {}
        for out in outputs:
            for path in files_under(out):
                files[str(path.relative_to(self.run_dir))] = self.sha256(path)
        self.data["stages"][key] = {
            "status": "done",
            "inputs": inputs,
            "outputs": files,
            "cost": cost or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))
        if self.storage is not None:
            self.storage.push([self.path])
