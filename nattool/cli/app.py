"""The `nattool` command: one Typer app, one function per subcommand."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nattool import __version__
from nattool.cli.config_cmd import app as config_app
from nattool.cli.output import set_verbosity
from nattool.cli.probe_cmd import probe
from nattool.cli.register_cmd import register
from nattool.cli.serve_cmd import serve
from nattool.cli.trackers_cmd import trackers
from nattool.cli.whoami_cmd import whoami

app = typer.Typer(
    name="nattool",
    help="NAT tracker (rendezvous) server and client toolkit: find your public endpoint, "
    "meet your peers, learn what your NAT does.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"nattool {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[Optional[bool], typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the answer (no progress or notes).")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail (repeatable).")] = 0,
) -> None:
    """NAT tracker server and client toolkit."""
    set_verbosity(quiet, verbose)


app.command()(serve)
app.command()(whoami)
app.command()(register)
app.command()(trackers)
app.command()(probe)
app.add_typer(config_app, name="config")


def main() -> None:
    app(prog_name="nattool")
