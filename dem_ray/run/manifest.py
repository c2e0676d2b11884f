"""The run manifest: what each stage read, wrote (with sha256) and cost.

A stage is skipped when its entry says done, its inputs hash is unchanged and every
output it recorded is still there with the same content. "Same content" is decided
cheaply: an output whose size and modification time are those recorded right after it
was hashed is trusted without reading it (`verify=True` re-hashes every byte). For a
bucket run the size and modification time are the object's, from one listing, so a
fresh machine decides what to run without downloading anything.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dem_ray.core.atomic import write_text_atomic
from dem_ray.core.hashing import hash_json, sha256_file
from dem_ray.run.storage import RunStorage, files_under

__all__ = ["Manifest", "files_under", "hash_json", "sha256_file", "write_text_atomic"]

log = logging.getLogger(__name__)

Listing = dict[str, tuple[int, int | None]]  # {path in the run: (size, mtime_ns)}


class Manifest:
    """With a URI run's `storage`, each record uploads the stage's outputs, then the manifest
    (for a local run directory the uploads do nothing)."""

    def __init__(self, run_dir: Path, storage: RunStorage | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.storage = storage
        self.path = self.run_dir / "manifest.json"
        self._hash_cache: dict[tuple[str, int, int], str] = {}
        self.bytes_hashed = 0  # what checks read, for the no-op benchmark
        self._saved = ""
        if self.path.exists():
            try:
                self._saved = self.path.read_text()
                self.data = json.loads(self._saved)
            except json.JSONDecodeError as exc:
                raise RuntimeError(
                    f"{self.path}: not valid JSON ({exc}); move it away to start the run afresh"
                ) from exc
        else:
            self.data = {"version": 2, "stages": {}}

    def entry(self, key: str) -> dict | None:
        return self.data["stages"].get(key)

    def is_recorded(self, key: str) -> bool:
        entry = self.entry(key)
        return entry is not None and entry.get("status") == "done"

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hash_cache:
            self._hash_cache[key] = sha256_file(path)
            self.bytes_hashed += stat.st_size
        return self._hash_cache[key]

    def outputs_hash(self, key: str) -> str:
        """A digest of a finished stage's outputs, for downstream input hashes."""
        entry = self.entry(key)
        if entry is None or entry.get("status") != "done":
            raise RuntimeError(f"stage '{key}' has not run in {self.run_dir}")
        return hash_json(entry["outputs"])

    def changed_inputs(self, key: str, parts: dict[str, str]) -> list[str]:
        """Which named inputs differ from those the stage ran with (all, if unknown)."""
        before = (self.entry(key) or {}).get("input_parts") or {}
        return sorted(k for k in set(parts) | set(before) if before.get(k) != parts.get(k))

    def is_done(
        self, key: str, inputs: str, verify: bool = False, listing: Listing | None = None
    ) -> bool:
        """Done with these inputs and every output intact (see the module docstring).

        `listing`: the bucket's files, for a URI run; outputs are then checked against
        it instead of the local mirror, which may be empty on a fresh machine.
        """
        if not self.is_recorded(key):
            return False
        entry = self.entry(key)
        if entry.get("inputs") != inputs:
            log.info("stage %s: its inputs changed since it ran", key)
            return False
        bad = self.damaged(key, verify=verify, listing=listing)
        if bad:
            path, why = bad[0]
            log.warning("stage %s: output %s %s; running the stage again", key, path, why)
            return False
        return True

    def damaged(
        self, key: str, verify: bool = False, listing: Listing | None = None
    ) -> list[tuple[Path, str]]:
        """Outputs of a finished stage that are gone or no longer what it wrote."""
        entry = self.entry(key)
        stats = entry.get("stats") or {}
        bad = []
        for rel, digest in entry["outputs"].items():
            path = self.run_dir / rel
            recorded = stats.get(rel)
            if verify and self.storage is not None and self.storage.remote:
                self.storage.pull(rel)  # --verify on a bucket run: hash the bytes themselves
            if listing is not None and not verify:
                found = listing.get(rel)
                if found is None:
                    bad.append((path, "is missing"))
                elif recorded is None or list(found) != list(recorded):
                    bad.append((path, "changed since the stage wrote it (size or time)"))
                continue
            if not path.is_file():
                bad.append((path, "is missing"))
                continue
            if not verify and recorded is not None and _stat(path) == list(recorded):
                continue  # as recorded right after hashing: trusted without reading
            if self.sha256(path) != digest:
                bad.append((path, "differs from what the stage wrote (sha256): damaged"))
            elif listing is None:  # same bytes (touched, or an older manifest): trust it next time
                entry.setdefault("stats", {})[rel] = _stat(path)
        return bad

    def record(
        self,
        key: str,
        inputs: str,
        outputs: list[Path],
        cost: dict | None = None,
        extra: dict | None = None,
        input_parts: dict[str, str] | None = None,
    ) -> None:
        if self.storage is not None:
            self.storage.push(outputs)  # before the stat: an upload sets the local mtime
        files: dict[str, str] = {}
        stats: dict[str, list[Any]] = {}
        for out in outputs:
            for path in files_under(out):
                rel = path.relative_to(self.run_dir).as_posix()
                files[rel] = self.sha256(path)
                stats[rel] = _stat(path)
        self.data["stages"][key] = {
            "status": "done",
            "inputs": inputs,
            "input_parts": input_parts or {},
            "outputs": files,
            "stats": stats,
            "cost": cost or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=2, sort_keys=True)
        write_text_atomic(self.path, text)
        self._saved = text
        if self.storage is not None:
            self.storage.push([self.path])

    def save_if_changed(self) -> None:
        """Save what changed without a record (e.g. input digests a no-op computed)."""
        if json.dumps(self.data, indent=2, sort_keys=True) != self._saved:
            self.save()


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]
