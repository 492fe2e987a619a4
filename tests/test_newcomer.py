"""A newcomer's first five minutes: do what README.md says, verbatim, on a fresh venv.

The commands are read from the README itself ("## Two commands" and "## A two-minute
tour"), so the README cannot drift from reality without this failing: a command that no
longer exists, an option renamed, output that looks different, a man page that `man`
cannot find after `pip install`.

The install runs once per session in a copy of the checkout, and offline: the README's
steps with pip pointed at local things instead of PyPI. A wheel of the copy is built by
the test venv's own setuptools (no build isolation, no index), a fresh venv is made, the
test venv's site-packages stand in for PyPI's dependencies (a .pth file), and pip installs
the wheel from the file with --no-index. So the wheel, its entry point and its man page
are the real ones, and no byte leaves the machine. Every nattool process talks to
127.0.0.1 only. The README's test command is checked, not run (it would run this test
again).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from conftest import REPO

# One lane (pytest-xdist group): the session's checkout is installed once, and two tests
# need the default port, which no other test binds.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("newcomer")]

INSTALL_TIMEOUT = 300
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
DEFAULT_PORT = 43283


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    text = readme()
    assert f"\n## {title}\n" in text, f'README has no "## {title}" section'
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def two_commands() -> tuple[str, str]:
    blocks = [b.strip() for b in code_blocks(section("Two commands"), "sh")]
    assert len(blocks) == 2, f"'## Two commands' should hold two sh blocks, has {len(blocks)}"
    return blocks[0], blocks[1]


def install_part(command: str) -> str:
    """The `&&` steps before the first one that runs nattool (or the tests)."""
    steps = [s.strip() for s in command.split("&&")]
    cut = next(i for i, s in enumerate(steps) if "nattool " in s + " " or "pytest" in s)
    assert cut > 0, command
    return " && ".join(steps[:cut])


def offline_build_problem() -> str | None:
    """Why this interpreter cannot build a wheel of the checkout without the network, if so."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python >= 3.8 has it
        return "importlib.metadata is missing"
    try:
        setuptools_version = version("setuptools")
    except PackageNotFoundError:
        return f"the test venv ({sys.prefix}) has no setuptools to build the checkout's wheel offline"
    numbers = tuple(int(n) for n in re.findall(r"\d+", setuptools_version)[:2])
    # setuptools builds wheels by itself from 70.1 on; before, it needs the `wheel` package.
    if numbers < (70, 1):
        try:
            version("wheel")
        except PackageNotFoundError:
            return (
                f"the test venv ({sys.prefix}) has setuptools {setuptools_version} (< 70.1, which needs the "
                "`wheel` package to build a wheel) and no `wheel`: building the checkout offline is impossible "
                "there; reinstall it with the README's test command (the test extra brings setuptools >= 70.1)"
            )
    return None


def clean_env(home: Path) -> dict[str, str]:
    """The developer's environment minus anything nattool reads, with an empty HOME for
    nattool (pip keeps its own cache/config so the install stays quick)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATTOOL_", "PYTHON", "VIRTUAL_ENV"))}
    env.pop("NO_COLOR", None)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_STATE_HOME=str(home / ".local" / "state"))
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm-256color")
    return env


@dataclass
class Checkout:
    root: Path
    home: Path
    env: dict[str, str]
    install_seconds: float = 0.0

    @property
    def venv(self) -> Path:
        return self.root / ".venv"


def offline_install(root: Path, wheels: Path, env: dict[str, str]) -> None:
    """The README's `python3 -m venv .venv && .venv/bin/pip install .`, with no network."""
    pip_env = dict(env, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")

    def step(what: str, argv: list[str]) -> None:
        result = subprocess.run(argv, cwd=root, env=pip_env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        assert result.returncode == 0, f"{what} failed ({' '.join(argv)}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    step("building a wheel of the checkout", [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), "."])
    built = sorted(wheels.glob("nattool-*.whl"))
    assert len(built) == 1, built
    step("making the venv", [sys.executable, "-m", "venv", ".venv"])
    venv_python = root / ".venv" / "bin" / "python"
    purelib = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    # The dependencies (typer, rich, dnspython, uvloop) from the test venv, where PyPI put them.
    ours = sysconfig.get_paths()
    Path(purelib, "zz_nattool_test_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in dict.fromkeys((ours["purelib"], ours["platlib"]))), encoding="utf-8"
    )
    # --ignore-installed: the test venv's own nattool (seen through that .pth) is not this one.
    step("installing the wheel", [str(venv_python), "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", str(built[0])])


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    """A copy of the repository with the README's install done in it, offline."""
    problem = offline_build_problem()
    if problem is not None:
        pytest.skip(problem)
    base = tmp_path_factory.mktemp("newcomer")
    root = base / "nattool"
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".hypothesis")
    shutil.copytree(REPO, root, ignore=ignore)
    home = base / "home"
    home.mkdir()
    env = clean_env(home)
    started = time.monotonic()
    offline_install(root, base / "wheels", dict(env, HOME=str(base / "pip-home")))  # pip's config and cache, not the user's
    return Checkout(root, home, env, time.monotonic() - started)


def run(co: Checkout, command: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=co.root, env=dict(co.env, **extra), capture_output=True, text=True, timeout=timeout)


# -- the two commands ------------------------------------------------------------------------------


def test_the_two_commands_have_the_expected_form() -> None:
    serve_command, test_command = two_commands()
    assert install_part(serve_command) == "python3 -m venv .venv && .venv/bin/pip install ."
    assert serve_command.endswith("&& .venv/bin/nattool serve")
    assert install_part(test_command).startswith("python3 -m venv .venv && .venv/bin/pip install")
    # The extras it installs exist, and CI runs exactly this command.
    extras = re.findall(r"\.\[([\w,-]+)\]", test_command)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ",".join(extras).split(","):
        assert extra in declared, f"README installs extra {extra!r}, pyproject declares {sorted(declared)}"
    assert test_command.endswith(".venv/bin/python -m pytest")
    assert test_command in (REPO / ".ci" / "run").read_text(), ".ci/run does not run the README's test command verbatim"


def test_install_gives_a_working_nattool(checkout: Checkout) -> None:
    result = run(checkout, ".venv/bin/nattool --help")
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^  (\w[\w-]*)\s", result.stdout.split("Commands:", 1)[1], re.M))
    in_readme = set(re.findall(r"^\| `nattool (\w[\w-]*)[^`]*` \|", readme(), re.M))
    assert in_readme, "the README's command table is gone"
    assert in_readme <= listed, f"the README lists commands nattool does not have: {sorted(in_readme - listed)}"
    assert listed <= in_readme, f"commands missing from the README's command table: {sorted(listed - in_readme)}"
    version = run(checkout, ".venv/bin/nattool --version")
    assert version.returncode == 0 and version.stdout.startswith("nattool ")


def test_man_nattool_finds_the_installed_page(checkout: Checkout) -> None:
    page = checkout.venv / "share" / "man" / "man1" / "nattool.1"
    assert page.is_file(), "pip install did not put the man page in <venv>/share/man/man1"
    assert page.read_text() == (REPO / "man" / "nattool.1").read_text()
    if shutil.which("man") is None:
        pytest.skip("man is not installed (.ci/run installs man-db)")
    env = dict(checkout.env, PATH=f"{checkout.venv / 'bin'}{os.pathsep}{checkout.env['PATH']}", MANPAGER="cat", PAGER="cat", MANWIDTH="80")
    for var in ("MANPATH", "MANOPT"):
        env.pop(var, None)
    where = subprocess.run(["man", "-w", "nattool"], env=env, capture_output=True, text=True, timeout=30)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == page.resolve()
    shown = subprocess.run(["man", "nattool"], env=env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.startswith("NATTOOL(1)"), shown.stderr


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def test_the_readme_serve_command_runs(checkout: Checkout) -> None:
    """The first command as written: a tracker with the SQLite store, whose path it prints."""
    if not port_free("0.0.0.0", DEFAULT_PORT):
        pytest.skip(f"UDP port {DEFAULT_PORT} is in use here; the README's command needs it")
    serve_command, _ = two_commands()
    child = pexpect.spawn("bash", ["-c", serve_command.split("&&")[-1].strip()], cwd=str(checkout.root), env=checkout.env, encoding="utf-8", timeout=15)
    try:
        child.expect(r"tracker listening on udp [^\r\n]*")
        banner = ANSI_RE.sub("", child.after)
        assert "sqlite" in banner and str(checkout.home) in banner, banner
        assert f":{DEFAULT_PORT}" in banner
    finally:
        child.kill(signal.SIGINT)
        child.expect(pexpect.EOF, timeout=10)
        child.close()
    assert child.exitstatus == 130, child.before  # Ctrl-C: interrupted


# -- the two-minute tour --------------------------------------------------------------------------


@dataclass
class Step:
    terminal: int
    command: str
    expected: list[str] = field(default_factory=list)


def tour_steps() -> list[Step]:
    steps: list[Step] = []
    for terminal, block in enumerate(code_blocks(section("A two-minute tour"), "console"), start=1):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(terminal, line[2:].strip()))
            elif line.strip():
                assert steps, f"output before any command in the tour: {line!r}"
                steps[-1].expected.append(line.rstrip())
    return steps


class Uuids:
    """README UUIDs stand for real ones; the first sighting binds each."""

    def __init__(self) -> None:
        self.real: dict[str, str] = {}

    def pattern(self, line: str) -> str:
        """A regex for an output line: numbers may differ, spacing may differ, a UUID
        already seen must be the same real UUID."""
        out = []
        for token in re.split(rf"({UUID}|\d+|\s+)", line.strip()):
            if not token:
                continue
            if re.fullmatch(UUID, token):
                known = self.real.get(token.lower())
                out.append(re.escape(known) if known else f"(?P<u{len(self.real)}_{len(out)}>{UUID})")
            elif token.isdigit():
                out.append(r"\d+")
            elif token.isspace():
                out.append(r"\s+")
            else:
                out.append(re.escape(token))
        return "".join(out)

    def bind(self, line: str, match: re.Match[str]) -> None:
        readme_ids = re.findall(UUID, line)
        real_ids = re.findall(UUID, match.group(0))
        for r, real in zip(readme_ids, real_ids):
            self.real.setdefault(r.lower(), real)

    def substitute(self, command: str) -> str:
        for r, real in self.real.items():
            command = re.sub(re.escape(r), real, command, flags=re.I)
        return command


def expect_lines(child: pexpect.spawn, lines: list[str], uuids: Uuids, timeout: float, what: str) -> None:
    for line in lines:
        pattern = uuids.pattern(line)
        try:
            child.expect(pattern, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF):
            seen = ANSI_RE.sub("", str(child.before))
            raise AssertionError(f"{what}: the README shows\n  {line}\nnattool printed:\n{seen}") from None
        uuids.bind(line, re.match(pattern, str(child.after)) or child.match)


def test_the_two_minute_tour(checkout: Checkout) -> None:
    steps = tour_steps()
    commands = " ".join(s.command for s in steps)
    assert "nattool serve" in commands and "nattool whoami" in commands and "nattool register" in commands
    if not port_free("127.0.0.1", DEFAULT_PORT):
        pytest.skip(f"UDP port {DEFAULT_PORT} is in use on 127.0.0.1; the tour uses the default port")
    env = dict(checkout.env, NO_COLOR="1", TERM="dumb")  # the text as a terminal shows it, minus styling
    uuids = Uuids()
    running: list[tuple[Step, pexpect.spawn]] = []
    try:
        for step in steps:
            if step.command.startswith("export "):
                for assignment in shlex.split(step.command)[1:]:
                    key, _, value = assignment.partition("=")
                    env[key] = value
                continue
            command = uuids.substitute(step.command)
            assert command.startswith(".venv/bin/nattool "), f"tour command not run from the venv: {command}"
            child = pexpect.spawn(
                "bash", ["-c", command], cwd=str(checkout.root), env=env, encoding="utf-8",
                codec_errors="replace", timeout=20, dimensions=(50, 200),
            )
            long_running = " serve" in command or "--keepalive" in command
            expect_lines(child, step.expected, uuids, 15, f"terminal {step.terminal}: {command}")
            if long_running:
                running.append((step, child))
                continue
            child.expect(pexpect.EOF, timeout=20)
            child.close()
            assert child.exitstatus == 0, f"{command} exited {child.exitstatus}: {child.before}"
        # "terminal 2 shows the newcomer (`+ 127.0.0.1:…`)"
        shows = re.search(r"terminal (\d) shows the newcomer \(`([^`…]*)", section("A two-minute tour"))
        if shows:
            term, prefix = int(shows.group(1)), shows.group(2)
            watchers = [c for s, c in running if s.terminal == term and "--keepalive" in s.command]
            assert watchers, f"terminal {term} runs nothing that could show a newcomer"
            watchers[0].expect(re.escape(prefix) + r"\d+", timeout=15)
    finally:
        for step, child in reversed(running):
            child.kill(signal.SIGINT)
            try:
                child.expect(pexpect.EOF, timeout=10)
            except pexpect.TIMEOUT:
                child.kill(signal.SIGKILL)
            child.close()
            assert "Traceback" not in str(child.before), child.before
            assert child.exitstatus in (0, 130), f"{step.command} ended with {child.exitstatus}/{child.signalstatus}"
