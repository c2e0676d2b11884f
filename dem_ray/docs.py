"""README tables generated from the code, so the docs cannot drift from it.

`python -m dem_ray.docs README.md` rewrites each generated region in place; the tests
fail when a region differs from what the code says.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dem_ray.stages import STAGES


def stage_table_markdown() -> str:
    """One row per stage: its command, manifest keys, outputs and what re-runs it."""
    rows = ["| command | stage (manifest key) | writes | re-run when these change |",
            "|---|---|---|---|"]  # fmt: skip
    for stage in STAGES:
        key = {
            "data": "`data/<name>`",
            "finetune": "`finetune/<name>`",
            "vectors": "`vectors/<name>`",
            "baseline": "`baseline/<mixture id>`",
            "baseline_best": "`baseline`",
            "downstream": "`downstream/<model>`",
        }.get(stage.name, f"`{stage.name}`")
        changes = "; ".join(f"**{name}**: {text}" for name, text in stage.invalidated_by.items())
        rows.append(f"| `{stage.command}` | {key} | {stage.outputs} | {changes} |")
    return "\n".join(rows) + "\n"


REGIONS = {"stage-table": stage_table_markdown}


def region(text: str, name: str) -> str | None:
    """The text between `<!-- NAME:start -->` and `<!-- NAME:end -->`, or None."""
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    return match.group(1) if match else None


def rewrite(path: Path) -> bool:
    """Regenerate every region in `path`; True when something changed."""
    text = path.read_text()
    new = text
    for name, render in REGIONS.items():
        new = re.sub(
            rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)",
            lambda m, r=render: m.group(1) + r() + m.group(3),
            new,
            flags=re.S,
        )
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["README.md"]:
        print(f"{arg}: {'rewritten' if rewrite(Path(arg)) else 'up to date'}")
