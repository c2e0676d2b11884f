"""The README says what the code does: its generated tables and its commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from dem_ray.cli import build_parser
from dem_ray.docs import region, stage_table_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_stage_table_is_what_the_stages_declare():
    table = region(README.read_text(), "stage-table")
    assert table is not None, "README.md has no <!-- stage-table:start --> region"
    assert table == stage_table_markdown(), "run `python -m dem_ray.docs README.md`"


def _subparsers(parser):
    [action] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def _readme_commands() -> list[list[str]]:
    """Every `dem-ray ...` line of the README's code blocks, split into words."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if "dem-ray " not in line or line.startswith(("mkdir", "sed")):
                continue
            words = shlex.split(line[line.index("dem-ray ") :])
            commands.append(words)
    return commands


def test_every_command_the_readme_shows_exists_with_its_flags():
    commands = _readme_commands()
    assert len(commands) >= 5, commands
    top = _subparsers(build_parser())
    for words in commands:
        names = words[1].split("|")
        for name in names:
            assert name in top, f"README shows `dem-ray {name}`, which the CLI does not have"
            parser = top[name]
            rest = words[2:]
            if name == "corpora":
                parser = _subparsers(parser)[rest[0]]
            known = {s for a in parser._actions for s in a.option_strings}
            for word in rest:
                flag = word.split("=")[0].strip("[]")
                if flag.startswith("--"):
                    assert flag in known, f"`dem-ray {name}` has no option {flag}"


def test_the_cli_has_a_command_per_stage_group():
    from dem_ray.stages import COMMANDS

    top = _subparsers(build_parser())
    assert set(COMMANDS) | {"run", "status", "plan", "corpora"} == set(top)
