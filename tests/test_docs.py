"""The documentation stays true to the command line: every `molgen COMMAND ... --option` written in README.md,
docs/, the model cards, the recipes and scripts/ names an option that COMMAND has, and every `--set section.key=value` a
setting that a run's config has. An option removed from the command line fails here until the text that still
shows it is changed (CHANGELOG.md is history: it may name what was removed)."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = "download|info|train|sample|evaluate|view|plot|export|models"
# a command line as the docs write it: up to the end of its code span, line or table cell
LINE = re.compile(rf"molgen ({COMMANDS})\b([^`\n|]*)")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
SETTING = re.compile(r"--set[ =]\"?([a-z_]+)\.([a-z_]+)=")


def documents() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found += sorted((ROOT / "weights").glob("*/README.md")) + sorted((ROOT / "weights").glob("*/*.toml"))
    return found + sorted((ROOT / "molgen" / "recipes").glob("*.toml")) + sorted((ROOT / "scripts").glob("*"))


def command_options() -> dict[str, set[str]]:
    import typer.main

    from molgen.cli import app

    group = typer.main.get_command(app)
    return {name: {o for p in c.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            for name, c in group.commands.items()}


def mentions(text: str, options: dict[str, set[str]]):
    """(line number, command, option) of each option written after `molgen COMMAND` that COMMAND lacks."""
    for m in LINE.finditer(text):
        for opt in OPTION.findall(m.group(2)):
            if opt not in options[m.group(1)]:
                yield text[:m.start()].count("\n") + 1, m.group(1), opt


def test_the_check_finds_an_option_that_no_longer_exists():
    options = command_options()
    text = "Run `molgen sample -n 10 --steps 4 -o out.sdf`.\nThen `molgen sample --refine 8 --fast`.\n"
    assert list(mentions(text, options)) == [(2, "sample", "--refine"), (2, "sample", "--fast")]
    assert list(mentions("| `molgen train --resume --out runs/x` | `--lr` |", options)) == []


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_command_lines_use_options_the_commands_have(path):
    wrong = [f"{path.name}:{line}: molgen {cmd} has no option {opt}"
             for line, cmd, opt in mentions(path.read_text(), command_options())]
    assert not wrong, "\n".join(wrong)


def test_documented_settings_exist():
    from molgen.config import RunConfig

    known = set()
    for section, kind in typing.get_type_hints(RunConfig).items():
        for k in typing.get_args(kind) or (kind,):
            if dataclasses.is_dataclass(k):
                known |= {(section, f.name) for f in dataclasses.fields(k)}
    assert ("optim", "lr") in known and ("distill", "pairs") in known
    wrong = [f"{p.name}: --set {s}.{k}" for p in documents()
             for s, k in SETTING.findall(p.read_text()) if (s, k) not in known and (s, k) != ("section", "key")]
    assert not wrong, "\n".join(wrong)
