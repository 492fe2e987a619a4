"""The `nattool` command: one Typer app, one function per subcommand.

Building the app is all that `--version`, `--help` and every shell-completion <TAB>
run, and every command pays for it first. So a command module imports at its top only
what its signature needs (typer, the shared options, the enums and defaults its options
show); what runs the command (the client and server machinery, asyncio, rich) is
imported inside the command's function and the helpers it calls.
tests/test_cli_startup.py holds the line.
"""

from __future__ import annotations

import difflib
import sys
from typing import Annotated, Optional

import typer

from nattool import __version__
from nattool.cli.bench_cmd import bench
from nattool.cli.config_cmd import app as config_app
from nattool.cli.connect_cmd import connect
from nattool.cli.help_format import NattoolCommand
from nattool.cli.probe_cmd import probe
from nattool.cli.register_cmd import register
from nattool.cli.serve_cmd import serve
from nattool.cli.trackers_cmd import trackers
from nattool.cli.whoami_cmd import whoami
from nattool.exit_codes import ExitCode

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
    from nattool.cli.output import set_verbosity

    set_verbosity(quiet, verbose)


# One line each in `nattool --help` (80 columns leave 66 for a summary).
app.command(cls=NattoolCommand, short_help="Run a tracker: //nat, registrations, tracker lists and STUN.")(serve)
app.command(cls=NattoolCommand, short_help="Show my public endpoint as each tracker sees it.")(whoami)
app.command(cls=NattoolCommand, short_help="Register in GROUP and list the group's members.")(register)
app.command(cls=NattoolCommand, short_help="List the trackers given or discovered, and those they know.")(trackers)
app.command(cls=NattoolCommand, short_help="Classify my NAT (RFC 4787 mapping and filtering).")(probe)
app.command(cls=NattoolCommand, short_help="Open direct UDP paths to GROUP's members (hole punching).")(connect)
app.command(cls=NattoolCommand, short_help="Load a tracker or STUN server; report rate, loss and latency.")(bench)
app.add_typer(config_app, name="config", short_help="Show the effective configuration and where it came from.")

# A suggestion for a mistyped option only when it is a near miss (--verbos, not --bogus).
SUGGESTION_CUTOFF = 0.8


def _click_kind(exc: BaseException) -> str | None:
    """Typer >= 0.26 vendors its own Click: recognise its exceptions by class name."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    for kind in ("NoArgsIsHelpError", "NoSuchOption", "UsageError", "ClickException", "Abort", "Exit"):
        if kind in names:
            return kind
    return None


def _no_such_option(exc: BaseException) -> str:
    option = str(getattr(exc, "option_name", ""))[:60].encode("unicode_escape").decode("ascii")
    near = difflib.get_close_matches(option, list(getattr(exc, "possibilities", None) or ()), n=1, cutoff=SUGGESTION_CUTOFF)
    return f"no such option: {option}" + (f" (did you mean {near[0]}?)" if near else "")


def main() -> None:
    """Run the CLI; every error, Click's parse errors included, is one line."""
    try:
        result = app(prog_name="nattool", standalone_mode=False)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]  # the help text, as asked
            sys.exit(int(ExitCode.USAGE))
        if kind in ("NoSuchOption", "UsageError", "ClickException"):
            message = _no_such_option(exc) if kind == "NoSuchOption" else exc.format_message()  # type: ignore[attr-defined]
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            sys.stderr.write(f"nattool: error: {message}{hint}\n")
            sys.exit(int(getattr(exc, "exit_code", ExitCode.USAGE)))
        if kind == "Abort":
            sys.stderr.write("interrupted\n")
            sys.exit(int(ExitCode.INTERRUPTED))
        raise
    sys.exit(result if isinstance(result, int) else 0)
