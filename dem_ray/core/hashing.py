"""Content digests: of JSON-able values (stage inputs) and of files (stage outputs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
