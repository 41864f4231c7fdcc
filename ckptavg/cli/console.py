"""What every command shares to talk to its user: the Typer app, the consoles (stderr for status, stdout for
tables and data), tables that fit them, one-line errors with their exit codes, and `--version`."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CkptavgError, CkptavgWarning, describe_os_error

TAGLINE = ("Post-hoc checkpoint averaging (LAWA, WMA, decay-shaped merges, EMA, SWA) of language-model training "
           "trajectories.")
app = typer.Typer(
    help=TAGLINE,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
# Piped output (logs, files) gets room for the wide tables; a terminal or $COLUMNS decides otherwise.
_WIDTH = None if os.environ.get("COLUMNS") or sys.stdout.isatty() else 120
err = Console(stderr=True, width=_WIDTH)
out = Console(width=_WIDTH)


def say(message: str, **style) -> None:
    """A line on stderr, where progress and status go (stdout is for tables and data)."""
    err.print(message, highlight=False, soft_wrap=True, **style)


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Library errors become one line on stderr and exit code 2 (bad input) or 3 (the operating
    system failed mid-run: a full disk, an I/O error, a permission, a vanished file); Ctrl-C 130.
    ckptavg's own warnings (a step left out, a legacy file loaded whole) are one line each too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CkptavgWarning):
                say(f"[yellow]warning:[/] {escape(str(message))}")
            else:
                shown(message, category, filename, lineno, file, line)

        try:
            with warnings.catch_warnings():
                warnings.showwarning = show
                return fn(*args, **kwargs)
        except CkptavgError as e:
            raise fail(str(e), e.exit_code) from None
        except OSError as e:
            raise fail(describe_os_error(e), 3) from None
        except KeyboardInterrupt:
            err.print("interrupted: no partial output was left behind")
            raise typer.Exit(130) from None

    return wrapper


def show_version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                 help="Print the version and exit."),
) -> None:
    """Post-hoc checkpoint averaging (LAWA, WMA, decay-shaped merges, EMA, SWA) of language-model training
    trajectories."""


def compact_table(title: str, **names) -> tuple:
    """A table that reads at 80 columns, and a shortener per group of names (`sources=[...]`): what every
    name of a group shares (`tiny-pythia-`, `-k5-nu50`) is said once in the title, not in every row, and
    no rules between columns. Returns (table, {group: shorten})."""
    from rich import box
    from rich.table import Table

    from ..report.tables import shared_affixes, shortened

    shorten, said = {}, []
    for group, values in names.items():
        prefix, suffix = shared_affixes(list(values))
        shorten[group] = lambda name, p=prefix, s=suffix: shortened(name, p, s)
        if prefix or suffix:
            said.append(f"{group} {prefix}*{suffix}")
    table = Table(title=title + "".join(f"; {x}" for x in said), title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0), pad_edge=False)
    return table, shorten
