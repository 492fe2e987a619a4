"""Generate the man page and the shell completion scripts from the live CLI.

    python -m nattool.cli.docgen all             # rewrite man/nattool.1 and completions/*
    python -m nattool.cli.docgen all --check     # exit 1 when a committed file is stale
    python -m nattool.cli.docgen man [--check]
    python -m nattool.cli.docgen completions [--check]

Everything per command (synopsis, description, arguments, options, defaults) is read
from the Typer app itself (``typer.main.get_command``), so a new subcommand appears in
the page by re-running the generator; only the prose around it (exit status,
environment, files, examples) lives here, and even that is checked against the code:
every exit code, every environment variable the config reads and every option used in
an example must exist, or generation fails.

The completion scripts are the CLI's own (Typer's ``_NATTOOL_COMPLETE=source_<shell>``);
they ask ``nattool`` for candidates at <TAB> time, so they follow the installed CLI.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import typer.main
from typer import _click

from nattool import __version__
from nattool.cli.help_format import argument_name, argument_usage
from nattool.config import ENV_CONFIG, KEYS
from nattool.exit_codes import ExitCode

PROG = "nattool"
COMPLETE_VAR = "_NATTOOL_COMPLETE"
MAN_PATH = Path("man") / "nattool.1"
COMPLETION_PATHS = {
    "bash": Path("completions") / "nattool.bash",
    "zsh": Path("completions") / "_nattool",
    "fish": Path("completions") / "nattool.fish",
}
REGENERATE = "python -m nattool.cli.docgen all"


# ---------------------------------------------------------------------- the CLI as data


@dataclass(frozen=True, slots=True)
class OptionDoc:
    opts: tuple[str, ...]  # every spelling, short ones first: ("-t", "--tracker")
    metavar: Optional[str]  # None for flags
    help: str


@dataclass(frozen=True, slots=True)
class ArgumentDoc:
    name: str
    required: bool
    variadic: bool
    help: str

    @property
    def usage(self) -> str:
        return argument_usage(self.name, self.required, self.variadic)


@dataclass(frozen=True, slots=True)
class CommandDoc:
    path: tuple[str, ...]  # () for nattool itself, ("config", "show") for a nested one
    short_help: str
    help: str
    arguments: tuple[ArgumentDoc, ...]
    options: tuple[OptionDoc, ...]
    subcommands: tuple["CommandDoc", ...]

    @property
    def name(self) -> str:
        return " ".join((PROG, *self.path))

    def walk(self) -> Iterator["CommandDoc"]:
        yield self
        for sub in self.subcommands:
            yield from sub.walk()

    def leaves(self) -> Iterator["CommandDoc"]:
        """The commands that run something (groups only dispatch)."""
        for cmd in self.walk():
            if cmd.path and not cmd.subcommands:
                yield cmd

    def find(self, path: Sequence[str]) -> Optional["CommandDoc"]:
        for cmd in self.walk():
            if cmd.path == tuple(path):
                return cmd
        return None

    def option_names(self) -> set[str]:
        return {o for opt in self.options for o in opt.opts}

    @property
    def usage(self) -> str:
        parts = [self.name, "[OPTIONS]"]
        if self.subcommands:
            parts += ["COMMAND", "[ARGS]..."]
        parts += [a.usage for a in self.arguments]
        return " ".join(parts)


def _clean(text: Optional[str]) -> str:
    """One paragraph of help: Typer's spacing (two blanks before "[default: ...]") and
    line breaks collapsed."""
    return " ".join((text or "").split())


def _metavar(param: Any, ctx: _click.Context, opts: Sequence[str]) -> Optional[str]:
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if param.metavar:
        return str(param.metavar)
    # Typer shows its type name ("<float>") when no metavar was given.
    record = param.get_help_record(ctx)
    words = (record[0] if record else "").replace(",", " ").split()
    shown = " ".join(w for w in words if w not in opts and not w.startswith("/")).strip("<>")
    return shown.upper() or "VALUE"


def _context(cmd: _click.Command, name: str, parent: Optional[_click.Context]) -> _click.Context:
    return _click.Context(cmd, info_name=name, parent=parent, **(cmd.context_settings or {}))


def _describe(cmd: _click.Command, ctx: _click.Context, path: tuple[str, ...]) -> CommandDoc:
    options: list[OptionDoc] = []
    arguments: list[ArgumentDoc] = []
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            record = param.get_help_record(ctx)
            arguments.append(
                ArgumentDoc(
                    name=argument_name(param),
                    required=bool(param.required),
                    variadic=param.nargs == -1,
                    help=_clean(record[1] if record else ""),
                )
            )
            continue
        opts = tuple(sorted([*param.opts, *param.secondary_opts], key=lambda o: (o.startswith("--"), o)))
        record = param.get_help_record(ctx)
        options.append(OptionDoc(opts=opts, metavar=_metavar(param, ctx, opts), help=_clean(record[1] if record else "")))
    subcommands: list[CommandDoc] = []
    if hasattr(cmd, "list_commands"):  # a group (Typer's vendored click has no Group to test)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            subcommands.append(_describe(sub, _context(sub, name, ctx), (*path, name)))
    helptext = cmd.help or ""
    short = cmd.short_help or _clean(helptext.split("\n\n")[0])
    return CommandDoc(path, short, helptext, tuple(arguments), tuple(options), tuple(subcommands))


def cli_tree(app: Optional[typer.Typer] = None) -> CommandDoc:
    """The live CLI (``nattool.cli.app.app`` unless given) as plain data."""
    if app is None:
        from nattool.cli.app import app as live_app

        app = live_app
    root = typer.main.get_command(app)
    return _describe(root, _context(root, PROG, None), ())


# ----------------------------------------------------------------------- roff helpers


def roff(text: str) -> str:
    """Escape running text for roff: backslashes, option dashes (so they copy as ASCII
    hyphen-minus), non-ASCII characters (groff -ww warns about raw UTF-8), and a leading
    control character."""
    text = text.replace("\\", "\\e")
    # Option names entirely (--alt-port), other hyphens (re-register) stay hyphens.
    text = re.sub(r"(?<![\w.])-+[\w-]*", lambda m: m.group(0).replace("-", "\\-"), text)
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    return text


def _line(text: str) -> str:
    return "\\&" + text if text[:1] in (".", "'") else text


def _paragraphs(text: str) -> list[str]:
    paras = [_clean(p.replace("\b", "")) for p in re.split(r"\n\s*\n", text or "")]
    return [p for p in paras if p]


def _b(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def _i(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def _option_head(opt: OptionDoc) -> str:
    head = ", ".join(_b(o) for o in opt.opts)
    return head + (f" {_i(opt.metavar)}" if opt.metavar else "")


def _usage_roff(cmd: CommandDoc) -> str:
    parts = [_b(cmd.name), "[\\fIOPTIONS\\fR]"]
    if cmd.subcommands:
        parts += ["\\fICOMMAND\\fR", "[\\fIARGS\\fR]..."]
    for arg in cmd.arguments:
        parts.append(argument_usage(arg.name, arg.required, arg.variadic, _i))
    return " ".join(parts)


# ------------------------------------------------------------------ hand-written prose

DESCRIPTION = [
    "Peers behind NATs ask a tracker for their public address and port, register under "
    "a shared group key, and get back the other members (with LAN addresses for members "
    "behind the same NAT) so that they can connect to each other directly. Trackers know "
    "each other. The same UDP port answers STUN, so standard STUN clients and "
    "nattool probe can tell what kind of NAT a host is behind.",
    "nattool speaks the wire protocol of the original NatTrackerServer: old clients work "
    "against nattool serve, and nattool's clients work against old servers. nattool "
    "contacts only the hosts it is given or configured with.",
]

CONFIGURATION = [
    "Settings come from, in order of precedence: command-line flags, environment "
    "variables, the config file, built-in defaults. The config file is TOML; it is "
    "given by --config FILE, else by NATTOOL_CONFIG, else it is "
    "$XDG_CONFIG_HOME/nattool/config.toml (see FILES). A missing default file is fine; "
    "a missing file named explicitly is an error. nattool config show prints every "
    "setting, its effective value and where it came from.",
    "Trackers given on the command line (-t or positional arguments) replace those from "
    "the environment and the file; --domain discovers trackers from the DNS SRV records "
    "_nattracker._udp.DOMAIN (RFC 2782 priority and weight), falling back to the "
    "domain's own A and AAAA records on port 43283. Every tracker name is asked on every "
    "address it has, IPv4 and IPv6.",
]

EXIT_STATUS: dict[ExitCode, str] = {
    ExitCode.OK: "Success.",
    ExitCode.FAILURE: "Failure: the command ran and the answer is no, or an operation failed.",
    ExitCode.USAGE: "Usage error: bad flags, arguments, configuration file or environment variable.",
    ExitCode.TIMEOUT: "Timeout: no tracker or server answered in time.",
    ExitCode.UNREACHABLE: "Unreachable: a name could not be resolved, or a socket could not be bound or used.",
    ExitCode.STORE: "The tracker's state store cannot be used (nattool serve).",
    ExitCode.INTERRUPTED: "Interrupted (SIGINT, Ctrl-C).",
}

# Variables the config reads (config.KEYS) must all be here; the others are read elsewhere.
ENVIRONMENT: dict[str, str] = {
    "NATTOOL_TRACKERS": "Trackers to ask when no -t is given: a comma-separated list of "
    "HOST[:PORT] or [IPv6]:PORT.",
    "NATTOOL_DOMAIN": "Discover trackers from the DNS SRV records of this domain, as --domain does.",
    "NATTOOL_TIMEOUT": "Seconds to wait for an answer, retries included, as --timeout.",
    "NATTOOL_RETRIES": "Retransmissions within the timeout, as --retries.",
    "NATTOOL_DNS_SERVER": "DNS server IP[:PORT] for tracker names and discovery, instead of "
    "the system's resolvers.",
    "NATTOOL_STORE": "State store of nattool serve, as --store.",
    "NATTOOL_TURN_SECRET": "TURN REST API secret of nattool serve, as --turn-secret "
    "(keeps the secret off the command line).",
    "NATTOOL_CONFIG": "Path of the config file, instead of the default one.",
    "NO_COLOR": "When set to a non-empty value, output has no colours (https://no-color.org). "
    "Output that is not a terminal never has colours or progress displays.",
    "XDG_CONFIG_HOME": "Base directory of the config file (default ~/.config).",
    "XDG_STATE_HOME": "Base directory of the default SQLite state file (default ~/.local/state).",
}

FILES: list[tuple[str, str]] = [
    (
        "$XDG_CONFIG_HOME/nattool/config.toml",
        "The config file (~/.config/nattool/config.toml by default; macOS: "
        "~/Library/Application Support/nattool/config.toml). Top-level keys: "
        "{client_keys}. A [serve] table takes the nattool serve options with _ for -: "
        "{serve_keys}.",
    ),
    (
        "$XDG_STATE_HOME/nattool/tracker.db",
        "The SQLite state of nattool serve with --store sqlite: (the default), with its "
        "-log2 (the log's second file), -wal and .lock files beside it "
        "(~/.local/state/nattool/tracker.db by default). "
        "One process per file: a running tracker keeps its files to itself (SQLite's "
        "exclusive locking; with --workers the workers share them), so read them with "
        "sqlite3 only while no tracker uses them. A corrupt file is never touched: move "
        "it aside or use --store memory.",
    ),
]

# (description, command line); every one is checked against the CLI at generation time.
EXAMPLES: list[tuple[str, str]] = [
    ("Run a tracker on loopback, state in memory:", "nattool serve --host 127.0.0.1 --store memory"),
    ("Ask it what my public endpoint is:", "NATTOOL_TRACKERS=127.0.0.1 nattool whoami"),
    (
        "Make a new group and stay in it, re-registering every 5 seconds:",
        "nattool register new --keepalive 5 -t 127.0.0.1",
    ),
    ("The same, for scripts:", "nattool register new -t 127.0.0.1 --json"),
    ("Find trackers from DNS:", "nattool trackers --domain example.org"),
    ("What kind of NAT am I behind?", "nattool probe 203.0.113.1"),
    ("Where does each setting come from?", "nattool config show"),
    (
        "Install as a systemd service:",
        "nattool serve --print-unit | sudo tee /etc/systemd/system/nattool.service",
    ),
]

SEE_ALSO = [("systemd.service", "5"), ("systemctl", "1"), ("stun", "1")]
# Files of the source repository the page refers readers to (a test holds them present).
REPOSITORY_DOCS = {
    "README.md": "installing, a tour and running a tracker",
    "docs/PROTOCOL.md": "the wire protocol, every message byte for byte",
}
SEE_ALSO_TEXT = (
    "RFC 4787 (NAT behavioural requirements for UDP), RFC 8489 (STUN), RFC 5780 (NAT "
    "behaviour discovery using STUN), RFC 2782 (DNS SRV). In the nattool source repository: "
    + "; ".join(f"{path} ({what})" for path, what in REPOSITORY_DOCS.items())
    + "."
)


class DocError(Exception):
    """The hand-written prose no longer matches the code."""


def check_prose(tree: CommandDoc) -> None:
    """Fail generation when the prose above drifts from the code."""
    missing = [c.name for c in ExitCode if c not in EXIT_STATUS]
    if missing:
        raise DocError(f"exit codes without a description in EXIT_STATUS: {missing}")
    read = {k.env for k in KEYS.values() if k.env} | {ENV_CONFIG}
    undocumented = sorted(read - ENVIRONMENT.keys())
    if undocumented:
        raise DocError(f"environment variables without a description in ENVIRONMENT: {undocumented}")
    for _, line in EXAMPLES:
        problems = example_problems(tree, line)
        if problems:
            raise DocError(f"example {line!r}: {'; '.join(problems)}")


def example_problems(tree: CommandDoc, line: str) -> list[str]:
    """What is wrong with a `nattool ...` command line (the first one in a pipeline,
    after any VAR=value assignments): an unknown command or option."""
    words = line.split("|")[0].split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words.pop(0)
    if not words or words[0] != PROG:
        return [f"does not start with {PROG}"]
    node = tree
    rest = words[1:]
    # Global options come before the command.
    while rest and rest[0].startswith("-"):
        if rest[0].split("=")[0] not in tree.option_names():
            return [f"{rest[0]} is not an option of nattool"]
        rest.pop(0)
    while rest and node.subcommands and not rest[0].startswith("-"):
        nxt = next((s for s in node.subcommands if s.path[-1] == rest[0]), None)
        if nxt is None:
            return [f"{rest[0]!r} is not a command of {node.name}"]
        node, rest = nxt, rest[1:]
    if node.subcommands:
        return [f"{node.name} needs a subcommand"]
    names = node.option_names()
    return [f"{w} is not an option of {node.name}" for w in rest if re.match(r"--?[A-Za-z0-9]", w) and w.split("=")[0] not in names]


# --------------------------------------------------------------------------- the page


def _changelog_date(root: Optional[Path]) -> str:
    """The release date of this version from CHANGELOG.md (empty while unreleased), so
    that the page does not change with the day it was generated on."""
    if root is None:
        return ""
    try:
        text = (root / "CHANGELOG.md").read_text(encoding="utf-8")
    except OSError:
        return ""
    m = re.search(r"^## \[" + re.escape(__version__) + r"\] - (\d{4}-\d{2}-\d{2})", text, re.M)
    return m.group(1) if m else ""


def render_man(tree: Optional[CommandDoc] = None, *, date: str = "") -> str:
    tree = tree if tree is not None else cli_tree()
    check_prose(tree)
    out: list[str] = []

    def emit(*lines: str) -> None:
        out.extend(lines)

    def para(text: str) -> None:
        emit(".PP", _line(roff(text)))

    def tp(head: str, body: str) -> None:
        emit(".TP", head)
        if body:
            emit(_line(roff(body)))

    emit(
        f".\\\" Generated by `{REGENERATE}` from the nattool CLI. Do not edit.",
        f'.TH NATTOOL 1 "{date}" "nattool {__version__}" "User Commands"',
        ".SH NAME",
        "nattool \\- NAT tracker (rendezvous) server and client toolkit",
        ".SH SYNOPSIS",
    )
    emit(".nf", f"{_b(PROG)} [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]...")
    for cmd in tree.leaves():
        emit(_usage_roff(cmd))
    emit(f"{_b(PROG)} {_b('--version')}", ".fi")

    emit(".SH DESCRIPTION")
    emit(_line(roff(_paragraphs(tree.help)[0] if tree.help else "")))
    for text in DESCRIPTION:
        para(text)
    para("Commands:")
    emit(".RS 4")
    for cmd in tree.leaves():
        tp(_b(" ".join(cmd.path)), cmd.short_help)
    emit(".RE")

    emit(".SH GLOBAL OPTIONS", _line(roff("These come before the command, e.g. nattool -q whoami.")))
    for opt in tree.options:
        tp(_option_head(opt), opt.help)

    emit(".SH COMMANDS")
    for cmd in tree.walk():
        if not cmd.path or cmd.subcommands:
            continue
        emit(f'.SS "{roff(cmd.name)}"', _usage_roff(cmd))
        for text in _paragraphs(cmd.help):
            para(text)
        for arg in cmd.arguments:
            tp(argument_usage(arg.name, True, arg.variadic, _i), arg.help)
        for opt in cmd.options:
            tp(_option_head(opt), opt.help)

    emit(".SH CONFIGURATION")
    for i, text in enumerate(CONFIGURATION):
        if i:
            emit(".PP")
        emit(_line(roff(text)))

    emit(".SH EXIT STATUS")
    for code in ExitCode:
        tp(_b(str(int(code))), EXIT_STATUS[code])

    emit(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT.items():
        tp(_b(name), text)

    emit(".SH FILES")
    client_keys = ", ".join(k for k in KEYS if "." not in k)
    serve_keys = ", ".join(k.split(".", 1)[1] for k in KEYS if k.startswith("serve."))
    for path, text in FILES:
        tp(_i(path), text.format(client_keys=client_keys, serve_keys=serve_keys))

    emit(".SH EXAMPLES")
    for text, line in EXAMPLES:
        emit(".PP", _line(roff(text)), ".PP", ".RS 4", ".nf", _line(roff(line)), ".fi", ".RE")

    emit(".SH SEE ALSO")
    emit(",\n".join(f"{_b(name)}({section})" for name, section in SEE_ALSO))
    para(SEE_ALSO_TEXT)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ completions


def package_root() -> Path:
    """The directory that holds the nattool package (the checkout, when run from one)."""
    return Path(__file__).resolve().parents[2]


def completion_script(shell: str) -> str:
    """The CLI's own completion script for ``shell``, as `_NATTOOL_COMPLETE=source_<shell>
    nattool` prints it (this package, not whatever `nattool` is on PATH)."""
    if shell not in COMPLETION_PATHS:
        raise ValueError(f"unknown shell {shell!r}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATTOOL_")}
    env[COMPLETE_VAR] = f"source_{shell}"
    env["PYTHONPATH"] = str(package_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    result = subprocess.run(
        [sys.executable, "-m", PROG], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"{COMPLETE_VAR}=source_{shell} {PROG} failed ({result.returncode}): {result.stderr}")
    script = result.stdout.strip("\n")
    header = f"# {shell} completion for {PROG}. Generated by `{REGENERATE}`; do not edit."
    lines = script.split("\n")
    if shell == "zsh":
        # `#compdef` must stay the first line for zsh's fpath autoloading. Typer's script only
        # registers itself (compdef), which is right when sourced, but when autoloaded from
        # fpath the file *is* the completion function and must complete on this very call,
        # as click's own zsh script does.
        func = re.search(r"^compdef (\S+) " + PROG + "$", script, re.M)
        if not lines[0].startswith("#compdef") or func is None:
            raise RuntimeError(f"unexpected zsh completion script from Typer:\n{script}")
        body = [ln for ln in lines[1:] if ln != func.group(0)]
        lines = [
            lines[0],
            header,
            *body,
            "if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then",
            f'  {func.group(1)} "$@"',
            "else",
            f"  {func.group(0)}",
            "fi",
        ]
    else:
        lines = [header, *lines]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ files


def expected_files(root: Path, which: str = "all") -> dict[Path, str]:
    """The generated files under ``root`` and their fresh contents."""
    out: dict[Path, str] = {}
    if which in ("all", "man"):
        out[root / MAN_PATH] = render_man(date=_changelog_date(root))
    if which in ("all", "completions"):
        for shell, rel in COMPLETION_PATHS.items():
            out[root / rel] = completion_script(shell)
    return out


def stale_files(root: Path, which: str = "all") -> list[Path]:
    stale = []
    for path, text in expected_files(root, which).items():
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
    return stale


def write_files(root: Path, which: str = "all") -> list[Path]:
    written = []
    for path, text in expected_files(root, which).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if path.read_text(encoding="utf-8") == text:
                continue
        except FileNotFoundError:
            pass
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nattool.cli.docgen", description="Generate man/nattool.1 and completions/* from the CLI."
    )
    parser.add_argument("what", choices=("all", "man", "completions"), nargs="?", default="all")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--root", type=Path, default=None, help="the checkout (default: the one holding this package)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    root = (args.root or package_root()).resolve()
    if not (root / "pyproject.toml").is_file():
        parser.error(f"{root} is not a nattool checkout (no pyproject.toml); give --root")
    try:
        if args.check:
            stale = stale_files(root, args.what)
            for path in stale:
                print(f"stale: {path.relative_to(root)} (run: {REGENERATE})", file=sys.stderr)
            return 1 if stale else 0
        for path in write_files(root, args.what):
            print(f"wrote {path.relative_to(root)}")
    except DocError as exc:
        print(f"docgen: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
