"""How help names arguments: GROUP, [TRACKER]... (Typer's own help shows {GROUP} in the
usage line and TRACKER <list[str]> in the list of arguments)."""

from __future__ import annotations

from typing import Any, Callable

from typer import _click
from typer.core import TyperCommand


def argument_usage(name: str, required: bool, variadic: bool, wrap: Callable[[str], str] = str) -> str:
    """NAME, [NAME] or [NAME]... ; a metavar that already says so ("[SERVER]...") is kept."""
    if "[" in name or name.endswith("..."):
        return wrap(name)
    text = wrap(name) + ("..." if variadic else "")
    return text if required else f"[{text}]"


def argument_name(param: Any) -> str:
    return str(param.metavar or (param.name or "ARG").upper())


class NattoolCommand(TyperCommand):
    """A Typer command whose usage line and argument list read like a man page."""

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(argument_usage(argument_name(param), bool(param.required), param.nargs == -1))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        arguments: list[tuple[str, str]] = []
        options: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                name = argument_name(param) + ("..." if param.nargs == -1 else "")
                arguments.append((name, record[1]))
            elif param.param_type_name == "option":
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
