"""Rendering for humans (rich) and machines (--json), and the error edge.

Rich already honours NO_COLOR and writes no colour codes or live displays when the
output is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator, NoReturn, TypeVar

import typer
from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment
from rich.table import Table

from nattool.errors import NattoolError
from nattool.exit_codes import ExitCode

T = TypeVar("T")



def _rstrip(line: list[Segment]) -> list[Segment]:
    """One rendered line without the blanks at its end."""
    segments = list(line)
    while segments and not segments[-1].control and not segments[-1].text.strip():
        segments.pop()
    if segments and not segments[-1].control:
        last = segments[-1]
        segments[-1] = Segment(last.text.rstrip(), last.style)
    return segments


class TrimmedLines:
    """A renderable drawn as the one it wraps, less the spaces at the end of each line
    (rich pads every cell of a table to its column's width, the last one too)."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        for line in console.render_lines(self.renderable, options, pad=False):
            yield from _rstrip(line)
            yield Segment.line()


class _Console(Console):
    """Tables are printed without trailing blanks."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*_trimmed(objects), **kwargs)


def _trimmed(objects: Iterable[Any]) -> Iterator[Any]:
    for obj in objects:
        yield TrimmedLines(obj) if isinstance(obj, Table) else obj


# NO_COLOR (https://no-color.org): no escape codes at all, bold included.
_plain = {"color_system": None} if os.environ.get("NO_COLOR") else {}
stdout = _Console(highlight=False, soft_wrap=True, **_plain)  # type: ignore[arg-type]
stderr = _Console(stderr=True, highlight=False, soft_wrap=True, **_plain)  # type: ignore[arg-type]

_verbosity = {"level": 0}


def set_verbosity(quiet: bool, verbose: int) -> None:
    _verbosity["level"] = -1 if quiet else verbose


def verbosity() -> int:
    return _verbosity["level"]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """Secondary human output (to stderr, so that stdout stays the answer)."""
    if verbosity() >= 0:
        stderr.print(message)


def fail(message: str, code: int = ExitCode.FAILURE) -> NoReturn:
    stderr.print(f"nattool: error: {message}", markup=False)
    raise typer.Exit(int(code))


def run_edge(body: Callable[[], T]) -> T:
    """Run a command body: our errors become one line and an exit code, Ctrl-C 130."""
    try:
        return body()
    except NattoolError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted", markup=False)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"
