"""Byte sizes written the Hugging Face way ("500KB", "100MB", "5GB"), as whole bytes.

Pure Python: the config validates `merge.max_shard_size` with it before anything heavy loads.
"""

from __future__ import annotations

import math
import re

UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
SIZE_HELP = (
    'a size such as "500KB", "100MB" or "5GB": a positive number and a unit, KB, MB, GB, TB '
    "(powers of 1000, as Hugging Face counts them) or KiB, MiB, GiB, TiB (powers of 1024)"
)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")


def parse_size(size: str | int) -> int:
    """Bytes in `size` (a whole number of bytes passes through); ValueError saying the form."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"{size} bytes is not a size; give {SIZE_HELP}")
        return size
    if not isinstance(size, str):
        raise ValueError(f"{type(size).__name__} {size!r} is not a size; give {SIZE_HELP}")
    match = _SIZE_RE.match(size)
    unit = match[2].upper() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"{size!r} is not a size; give {SIZE_HELP}")
    value = math.floor(float(match[1]) * UNITS[unit])
    if value < 1:
        raise ValueError(f"{size!r} is less than one byte; give {SIZE_HELP}")
    return value
