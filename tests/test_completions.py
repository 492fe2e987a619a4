"""Shell completion: the committed scripts are the CLI's own and fresh, real shells
(bash, zsh, fish driven by pexpect) complete commands and options with them, and the
completion protocol offers every command and option of the live CLI.

The scripts call `nattool` at <TAB> time; the tests put a `nattool` on PATH that runs
this checkout (as an installed console script would).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import pexpect
import pytest
import typer

from conftest import REPO, nattool_env
from nattool.cli import docgen
from nattool.cli.complete import complete_trackers, configured_trackers

COMPLETIONS = REPO / "completions"


# -- the committed files ------------------------------------------------------------------


@pytest.mark.parametrize("shell", sorted(docgen.COMPLETION_PATHS))
def test_committed_script_is_fresh(shell: str) -> None:
    path = REPO / docgen.COMPLETION_PATHS[shell]
    assert path.is_file(), f"{path} is missing; run: {docgen.REGENERATE}"
    assert path.read_text() == docgen.completion_script(shell), f"{path} is stale; run: {docgen.REGENERATE}"


def test_scripts_are_typers_own() -> None:
    """The generator adds a header (and, for zsh, the fpath entry point), nothing else:
    every line Typer prints is in the committed file."""
    env = nattool_env(None)
    for shell in docgen.COMPLETION_PATHS:
        env[docgen.COMPLETE_VAR] = f"source_{shell}"
        typer_says = subprocess.run(
            [sys.executable, "-m", "nattool"], capture_output=True, text=True, env=env, timeout=30, check=True
        ).stdout
        committed = (REPO / docgen.COMPLETION_PATHS[shell]).read_text().splitlines()
        missing = [ln for ln in typer_says.splitlines() if ln.strip() and ln not in committed]
        if shell == "zsh":  # moved into the if/else that also serves fpath autoloading
            missing = [ln for ln in missing if not ln.startswith("compdef ")]
        assert not missing, (shell, missing)
    assert (REPO / docgen.COMPLETION_PATHS["zsh"]).read_text().startswith("#compdef nattool\n")


def test_check_mode_fails_on_a_stale_file_and_write_mode_fixes_it(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    for rel in ("pyproject.toml", "CHANGELOG.md", "man", "completions"):
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, root / rel)
        else:
            root.mkdir(exist_ok=True)
            shutil.copy(src, root / rel)

    def gen(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nattool.cli.docgen", *args, "--root", str(root)],
            capture_output=True, text=True, env=nattool_env(None), timeout=120,
        )

    # Fresh, whatever the state of the committed files. (That --check passes on fresh files
    # is asserted at the end, after the repair: each run costs four interpreter start-ups.)
    assert gen("all").returncode == 0
    (root / "completions" / "nattool.fish").write_text("# hand-edited\n")
    (root / "man" / "nattool.1").unlink()
    result = gen("all", "--check")
    assert result.returncode == 1
    assert "completions/nattool.fish" in result.stderr and "man/nattool.1" in result.stderr
    written = gen("all")
    assert written.returncode == 0 and "nattool.fish" in written.stdout
    assert gen("all", "--check").returncode == 0
    assert (root / "completions" / "nattool.fish").read_text() == (REPO / "completions" / "nattool.fish").read_text()


# -- the completion protocol against the live CLI ---------------------------------------------


def complete_bash(words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """What `nattool` offers for the last word of ``words``, as bash asks for it."""
    env = dict(env or nattool_env(None))
    env.update({docgen.COMPLETE_VAR: "complete_bash", "COMP_WORDS": " ".join(words), "COMP_CWORD": str(len(words) - 1)})
    result = subprocess.run([sys.executable, "-m", "nattool"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result
    return result.stdout.split()


def test_every_command_is_offered() -> None:
    tree = docgen.cli_tree()
    offered = complete_bash(["nattool", ""])
    for sub in tree.subcommands:
        assert sub.path[-1] in offered, (sub.path, offered)
    for group in (c for c in tree.walk() if c.path and c.subcommands):
        offered = complete_bash(["nattool", *group.path, ""])
        assert {s.path[-1] for s in group.subcommands} <= set(offered), (group.path, offered)


def offered_in_process(path: tuple[str, ...] | list[str], incomplete: str) -> set[str]:
    """What Typer's bash completion offers for ``incomplete`` after ``nattool *path``, run in
    this process on the live CLI: the code `nattool` runs at <TAB> once it has split
    COMP_WORDS, without an interpreter start-up per question."""
    from typer._completion_classes import BashComplete

    from nattool.cli.app import app

    comp = BashComplete(typer.main.get_command(app), {}, "nattool", docgen.COMPLETE_VAR)
    return {item.value for item in comp.get_completions(list(path), incomplete)}


def test_in_process_completion_is_what_nattool_offers() -> None:
    """offered_in_process against the real `nattool` process, for a command with many options."""
    assert offered_in_process(["serve"], "--") == set(complete_bash(["nattool", "serve", "--"]))


def test_every_long_option_of_every_command_is_offered() -> None:
    for cmd in docgen.cli_tree().leaves():
        offered = offered_in_process(cmd.path, "--")
        longs = {o for o in cmd.option_names() if o.startswith("--")}
        assert longs <= offered, (cmd.name, sorted(longs - offered))


# -- real shells -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH with a `nattool` that runs this checkout, an empty HOME, no rc files."""
    base = tmp_path_factory.mktemp("shells")
    bindir, home = base / "bin", base / "home"
    bindir.mkdir()
    home.mkdir()
    shim = bindir / "nattool"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m nattool "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = nattool_env(home)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env["TERM"] = "dumb"
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")  # fish writes its history there
    for var in ("BASH_ENV", "ENV", "ZDOTDIR", "PROMPT_COMMAND"):
        env.pop(var, None)
    return env


def _shell_or_skip(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it with apt-get)")
    return path


SHELLS = {
    # name: (argv, setup lines run before the test types anything)
    "bash": (["--norc", "--noprofile", "-i"], ["PS1='$ '", f"source {COMPLETIONS / 'nattool.bash'}"]),
    "zsh-source": (
        ["-f", "-i"],
        ["PS1='$ '", "autoload -Uz compinit && compinit -u -D", f"source {COMPLETIONS / '_nattool'}"],
    ),
    "zsh-fpath": (["-f", "-i"], ["PS1='$ '", f"fpath=({COMPLETIONS} $fpath)", "autoload -Uz compinit && compinit -u -D"]),
    "fish": (["--no-config", "-i"], [f"source {COMPLETIONS / 'nattool.fish'}"]),
}
# A computed marker proves the shell ran the line (not that the terminal echoed our typing).
READY = {"fish": "echo READY-(math 6 \\* 7)"}


@pytest.fixture
def shell(request: pytest.FixtureRequest, shell_env: dict[str, str]) -> Iterator[pexpect.spawn]:
    name: str = request.param
    argv, setup = SHELLS[name]
    child = pexpect.spawn(
        _shell_or_skip(name.split("-")[0]), argv, env=shell_env, encoding="utf-8", codec_errors="replace",
        timeout=20, dimensions=(40, 200),
    )
    for line in setup:
        child.sendline(line)
    child.sendline(READY.get(name, "echo READY-$((6*7))"))
    child.expect("READY-42")
    yield child
    child.sendline("exit")
    child.close(force=True)


def tab_complete(child: pexpect.spawn, typed: str) -> str:
    """Type ``typed``, press TAB, and return the command line the shell then holds.

    The line is read back by turning it into ``echo @@''@@...`` (Ctrl-A, type, Enter),
    so what we check is the shell's own buffer, not an echo of our keystrokes.
    """
    child.send(typed + "\t")
    # No need to wait for the completion (it starts an interpreter): the shell reads the
    # keys typed meanwhile only after it.
    # The quotes keep the echo of what we type from matching: only the output says @@@@.
    child.send("\x01echo @@''@@\x05\r")
    child.expect(r"@@@@([^\r\n]*)\r?\n")
    return str(child.match.group(1)).strip()


ALL_SHELLS = list(SHELLS)


@pytest.mark.parametrize("shell", ALL_SHELLS, indirect=True)
def test_shell_completes_a_command(shell: pexpect.spawn) -> None:
    assert tab_complete(shell, "nattool wh") == "nattool whoami"


@pytest.mark.parametrize("shell", ALL_SHELLS, indirect=True)
def test_shell_completes_an_option_of_a_subcommand(shell: pexpect.spawn) -> None:
    assert tab_complete(shell, "nattool serve --rate") == "nattool serve --rate-limit"


@pytest.mark.parametrize("shell", ["bash"], indirect=True)
def test_bash_completes_a_nested_command(shell: pexpect.spawn) -> None:
    assert tab_complete(shell, "nattool config sh") == "nattool config show"


# -- trackers from the configuration ----------------------------------------------------------


def test_configured_trackers_from_env_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('trackers = ["tracker.example.org", "[2001:db8::1]:43283"]\n')
    from_file = configured_trackers(str(cfg), environ={"HOME": str(tmp_path)})
    # The config normalises each tracker to HOST:PORT; completion offers that form.
    assert [t for t, _ in from_file] == ["tracker.example.org:43283", "[2001:db8::1]:43283"]
    assert all("file" in src for _, src in from_file)
    from_env = configured_trackers(str(cfg), environ={"HOME": str(tmp_path), "NATTOOL_TRACKERS": "192.0.2.1,192.0.2.2:9"})
    assert [t for t, _ in from_env] == ["192.0.2.1:43283", "192.0.2.2:9"]
    # A broken file gives no candidates instead of an error in the middle of a prompt.
    cfg.write_text("trackers = [\n")
    assert configured_trackers(str(cfg), environ={"HOME": str(tmp_path)}) == []
    assert configured_trackers(str(tmp_path / "missing.toml"), environ={"HOME": str(tmp_path)}) == []


def _mini_app() -> typer.Typer:
    """A command with --tracker wired the way nattool/cli/options.py should wire it."""
    app = typer.Typer(add_completion=True)

    @app.command()
    def ask(
        tracker: Annotated[Optional[list[str]], typer.Option("--tracker", "-t", autocompletion=complete_trackers)] = None,
        config: Annotated[Optional[str], typer.Option("--config")] = None,
    ) -> None:
        pass

    @app.command()
    def other() -> None:
        pass

    return app


def test_tracker_completion_through_typers_machinery(tmp_path: Path) -> None:
    """complete_trackers as Typer calls it: prefix filter, and --config on the line wins."""
    from typer._completion_classes import BashComplete  # the machinery `nattool` runs at <TAB>

    cfg = tmp_path / "other.toml"
    cfg.write_text('trackers = ["198.51.100.7:4000", "tracker.example.net"]\n')
    cmd = typer.main.get_command(_mini_app())

    def candidates(args: list[str], incomplete: str) -> list[str]:
        comp = BashComplete(cmd, {}, "prog", "_PROG_COMPLETE")
        return [item.value for item in comp.get_completions(args, incomplete)]

    old = os.environ.get("NATTOOL_TRACKERS")
    os.environ["NATTOOL_TRACKERS"] = "192.0.2.1,192.0.2.55:43283,tracker.example.org"
    try:
        assert candidates(["ask", "-t"], "") == ["192.0.2.1:43283", "192.0.2.55:43283", "tracker.example.org:43283"]
        assert candidates(["ask", "--tracker"], "192.0.2.5") == ["192.0.2.55:43283"]
        del os.environ["NATTOOL_TRACKERS"]
        assert candidates(["ask", "--config", str(cfg), "-t"], "") == ["198.51.100.7:4000", "tracker.example.net:43283"]
    finally:
        if old is None:
            os.environ.pop("NATTOOL_TRACKERS", None)
        else:
            os.environ["NATTOOL_TRACKERS"] = old


def test_live_cli_completes_configured_trackers(tmp_path: Path) -> None:
    """End to end through `nattool` itself, once options.py wires complete_trackers."""
    from nattool.cli import options

    wired = any(getattr(meta, "autocompletion", None) is complete_trackers for meta in options.TrackerOpt.__metadata__)
    if not wired:
        pytest.skip("nattool/cli/options.py does not pass autocompletion=complete_trackers to --tracker yet")
    env = nattool_env(tmp_path, NATTOOL_TRACKERS="192.0.2.1,192.0.2.2:9")
    assert complete_bash(["nattool", "whoami", "-t", ""], env) == ["192.0.2.1:43283", "192.0.2.2:9"]
    assert complete_bash(["nattool", "trackers", "--tracker", "192.0.2.2"], env) == ["192.0.2.2:9"]
