"""What a `nattool` process imports before it knows which command runs.

`--version`, `--help` and every shell-completion <TAB> only build the Typer app; the
test suite starts hundreds of such processes. The client and server machinery (and
asyncio, rich, dnspython under it) must be imported by the command that runs, never by
building the app. This checks the structure (the modules loaded), not a time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import nattool_env

# Prefixes of modules that building the app must not import.
MACHINERY = (
    "nattool.api",
    "nattool.config",
    "nattool.diag",
    "nattool.net",
    "nattool.store",
    "nattool.tracker",
    "nattool.protocol.connect_rules",
    "nattool.protocol.connect_session",
    "nattool.protocol.connect_events",
    "nattool.protocol.nat_behaviour",
    "nattool.protocol.stun",
    "nattool.protocol.text",
    "nattool.protocol.turn",  # turn, turn_server, turn_client ...
    "nattool.cli.targets",
    "nattool.cli.connect_render",
    "asyncio",
    "dns",
)
# Typer itself loads rich to print help, and pydantic (socket under it) to coerce the
# parameters of a command it enters: not ours to spare. Where it does neither, our
# rendering (rich) must not be loaded either.
RENDERING = ("rich", "nattool.cli.output")

# Runs the real entry point and, on the way out, lists every module it had loaded.
_PROBE = (
    "import atexit, sys\n"
    "out = sys.argv[1]\n"
    "def _dump():\n"
    "    with open(out, 'w') as f:\n"
    "        f.write('\\n'.join(sorted(sys.modules)))\n"
    "atexit.register(_dump)\n"
    "sys.argv = ['nattool', *sys.argv[2:]]\n"
    "from nattool.cli.app import main\n"
    "main()\n"
)


def loaded_modules(tmp_path: Path, *args: str, **env: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    out = tmp_path / "modules.txt"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=nattool_env(tmp_path, **env),
    )
    return set(out.read_text().split()), proc


def among(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith((p + ".", p + "_")) for p in prefixes))


COMPLETE = {"_NATTOOL_COMPLETE": "complete_bash", "COMP_CWORD": "1"}


@pytest.mark.parametrize(
    ("args", "env", "forbidden"),
    [
        (("--version",), {}, MACHINERY + RENDERING),
        (("--help",), {}, MACHINERY),
        (("connect", "--help"), {}, MACHINERY),
        (("serve", "--help"), {}, MACHINERY),
        ((), {**COMPLETE, "COMP_WORDS": "nattool con"}, MACHINERY + RENDERING),
        ((), {**COMPLETE, "COMP_WORDS": "nattool connect --re", "COMP_CWORD": "2"}, MACHINERY + RENDERING),
    ],
    ids=["version", "help", "connect-help", "serve-help", "complete-command", "complete-option"],
)
def test_building_the_app_imports_no_machinery(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], forbidden: tuple[str, ...]
) -> None:
    modules, proc = loaded_modules(tmp_path, *args, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout  # it did its job (version, help, candidates) ...
    assert "nattool.cli.connect_cmd" in modules  # ... with the whole app built
    assert among(modules, forbidden) == []


def test_a_command_that_runs_imports_what_it_needs(tmp_path: Path) -> None:
    """The other side of the check: commands do import from those lists when they run,
    so the test would see it if building the app did."""
    modules, proc = loaded_modules(tmp_path, "config", "path")
    assert proc.returncode == 0, proc.stderr
    assert {"nattool.config", "nattool.cli.output", "rich"} <= set(among(modules, MACHINERY + RENDERING))
