"""The README and docs/ say only what is true of this commit: every relative link leads to a file (and a
heading) that exists, every `ckptavg ...` command line they quote names commands and options the CLI has
(per its own parser, as `--help` shows them), and the troubleshooting page names every error class."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from ckptavg import errors
from ckptavg.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(ckptavg [^`]+)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_somewhere(page):
    for m in LINK.finditer(FENCE.sub("", page.read_text())):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(where), f"{page.name}: link to {target}: no such heading"


def quoted_commands(page: Path) -> list[str]:
    text = page.read_text()
    lines = []
    for block in FENCE.findall(text):
        joined = block.replace("\\\n", " ")
        lines += [ln.strip().removeprefix("$ ") for ln in joined.splitlines()]
    lines += INLINE.findall(FENCE.sub("", text))
    return [ln for ln in lines if ln.startswith("ckptavg ")]


def options_of(command) -> set[str]:
    names = {"--help"}
    for p in command.params:
        names.update(p.opts + p.secondary_opts)
    return names


ROOT_COMMAND = typer.main.get_command(app)


def check(line: str) -> None:
    words = shlex.split(line, comments=True)[1:]
    command = ROOT_COMMAND  # typer's own click (typer 0.29 vendors it): groups are what have commands
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        name = words.pop(0)
        if name.isupper():  # a placeholder: `ckptavg COMMAND --help`
            return
        alternatives = name.split("|")
        for alt in alternatives:
            assert alt in command.commands, f"`{line}`: no command {alt!r} (has {', '.join(command.commands)})"
        command = command.commands[alternatives[0]]
    known = options_of(command)
    for word in words:
        if word.startswith("-") and not re.fullmatch(r"-?\d[\d.,]*", word):
            assert word.split("=")[0] in known, f"`{line}`: {command.name} has no option {word.split('=')[0]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_quoted_command_line_is_one_the_cli_takes(page):
    for line in quoted_commands(page):
        check(line)


def test_the_check_itself_catches_a_wrong_option_and_a_wrong_command():
    with pytest.raises(AssertionError, match="no option --frobnicate"):
        check("ckptavg trajectory runs/x --frobnicate 3")
    with pytest.raises(AssertionError, match="no command 'averge'"):
        check("ckptavg averge a b")
    check("ckptavg study run FILE --follow --until 100")  # a group's command


def test_troubleshooting_names_every_error_class():
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.CkptavgError)]
    missing = [c.__name__ for c in classes if f"`{c.__name__}`" not in page]
    assert not missing, f"docs/troubleshooting.md lacks {missing}"
    for code in {c.exit_code for c in classes}:
        assert f"| {code} |" in page
