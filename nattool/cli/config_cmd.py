"""`nattool config show|path`: the effective settings and where each came from."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import typer

from nattool.cli.help_format import NattoolCommand
from nattool.cli.options import ConfigOpt, JsonOpt

app = typer.Typer(
    name="config",
    help="Show the effective configuration (flags > environment > config file > defaults).",
    no_args_is_help=True,
    add_completion=False,
)


def _config_path(ctx: typer.Context, local: Optional[str]) -> Optional[str]:
    # A --config given to the main command (if it has one) counts as well as a local one.
    if local:
        return local
    root = ctx.find_root().params.get("config")
    if isinstance(root, str) and root:
        return root
    return None


def _render(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "-"
    return str(value)


@app.command("show", cls=NattoolCommand)
def show(ctx: typer.Context, json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Print every setting, its effective value and where it came from."""
    from rich.table import Table

    from nattool.cli.output import emit_json, info, run_edge, stdout
    from nattool.config import load_settings

    def body() -> int:
        settings = load_settings({}, config_path=_config_path(ctx, config), environ=os.environ)
        if json_out:
            emit_json(settings.to_json())
            return 0
        state = "" if settings.config_loaded else " (not present)"
        info(f"config file: {settings.config_path}{state}, from {settings.config_path_source}".replace("[", r"\["))
        rows = [(s.key, _render(s.value), s.source) for s in settings.items()]
        if sys.stdout.isatty():
            table = Table("key", "value", "source")
            for row in rows:
                table.add_row(*row)
            stdout.print(table)
        else:
            # Piped: plain aligned columns that grep and cut can use, no box drawing.
            width_key = max(len(r[0]) for r in rows)
            width_value = max(len(r[1]) for r in rows)
            for key, value, source in rows:
                sys.stdout.write(f"{key:<{width_key}}  {value:<{width_value}}  {source}\n")
        return 0

    raise typer.Exit(run_edge(body))


@app.command("path", cls=NattoolCommand)
def path(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Print the path of the config file in use (it may not exist yet)."""
    from nattool.cli.output import info, run_edge
    from nattool.config import config_path_in_use

    def body() -> int:
        where, source, _explicit = config_path_in_use(_config_path(ctx, config), os.environ)
        sys.stdout.write(f"{where}\n")
        if not where.exists():
            info(f"no file there yet (path from {source}); 'nattool config show' lists the keys")
        return 0

    raise typer.Exit(run_edge(body))
