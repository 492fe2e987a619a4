"""The shipped systemd unit: printed by `nattool serve --print-unit` with ExecStart
running the nattool that printed it with the flags given, accepted by systemd's own
checker, and hardened (systemd-analyze security)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import nattool_cmd, nattool_env, run_nattool

ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit_text(home: Path, *flags: str) -> str:
    result = run_nattool("serve", "--print-unit", *flags, home=home)
    assert result.returncode == 0, result
    return result.stdout


def exec_start(text: str) -> str:
    found = re.findall(r"^ExecStart=(.*)$", text, re.M)
    assert len(found) == 1, text
    return found[0]


def test_unit_runs_the_tracker_unprivileged_with_its_state_directory(tmp_path: Path) -> None:
    text = unit_text(tmp_path)
    # Run as `python -m nattool`: the unit runs this Python (the virtualenv's, not
    # the one its symlink points to) the same way.
    assert exec_start(text) == f"{sys.executable} -m nattool serve --store sqlite:%S/nattool/tracker.db"
    for line in ("DynamicUser=yes", "StateDirectory=nattool", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line


def test_unit_carries_the_flags_given_with_it(tmp_path: Path) -> None:
    flags = (
        "--host", "[::1]", "--host", "127.0.0.1", "-p", "4444", "--rate-limit", "12.5", "--ttl", "60",
        "--workers", "2", "--log-level", "warning", "--no-stun", "--join", "192.0.2.1:43283",
        "--max-group-members", "50", "--metrics", "9100",
    )  # fmt: skip
    assert exec_start(unit_text(tmp_path, *flags)) == (
        f"{sys.executable} -m nattool serve --store sqlite:%S/nattool/tracker.db --host [::1] --host 127.0.0.1"
        " --port 4444 --ttl 60 --rate-limit 12.5 --no-stun --join 192.0.2.1:43283 --max-group-members 50"
        " --metrics 9100 --workers 2 --log-level warning"
    )


def test_unit_quotes_what_systemd_would_split_or_expand(tmp_path: Path) -> None:
    """A path with a space, a % (a systemd specifier) and a $ (a variable); relative
    paths become absolute, since a service runs in /."""
    config = tmp_path / "my conf.toml"
    config.write_text("")
    result = subprocess.run(
        nattool_cmd("serve", "--print-unit", "--store", "sqlite:state dir/t%1$x.db", "--config", config.name),
        capture_output=True, text=True, timeout=30, env=nattool_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result
    assert exec_start(result.stdout) == (
        f'{sys.executable} -m nattool serve --store "sqlite:{tmp_path}/state dir/t%%1$$x.db" --config "{config}"'
    )


def test_unit_runs_the_nattool_script_that_printed_it(tmp_path: Path) -> None:
    """Installed, nattool is a script on PATH: the unit runs that script, by its path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nattool"
    script.write_text(f"#!{sys.executable}\nfrom nattool.cli.app import main\nmain()\n")
    script.chmod(0o755)
    env = nattool_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["nattool", "serve", "--print-unit", "--port", "4444"], capture_output=True, text=True, timeout=30, env=env, cwd="/"
    )
    assert result.returncode == 0, result
    assert exec_start(result.stdout) == f"{script} serve --store sqlite:%S/nattool/tracker.db --port 4444"


def test_a_path_the_unit_hides_from_the_service_gets_a_note(tmp_path: Path) -> None:
    """ProtectHome=yes: a store (or nattool itself, from pipx) in a home directory is
    out of the service's reach; the unit is still printed, with a note on stderr."""
    from nattool.cli.systemd_unit import is_hidden_by_protect_home

    result = run_nattool("serve", "--print-unit", "--store", "sqlite:/home/someone/t.db", home=tmp_path)
    assert result.returncode == 0 and exec_start(result.stdout).endswith(" --store sqlite:/home/someone/t.db"), result
    notes = result.stderr.splitlines()
    assert "note: the service cannot reach /home/someone/t.db (the unit's ProtectHome=yes hides" in notes[-1], notes
    assert len(notes) == 1 + is_hidden_by_protect_home(sys.executable), notes
    plain = run_nattool("serve", "--print-unit", home=tmp_path)
    assert plain.returncode == 0 and len(plain.stderr.splitlines()) == is_hidden_by_protect_home(sys.executable), plain


@pytest.mark.parametrize("flags", [("--port", "70000"), ("--host", "nowhere"), ("--ttl", "0"), ("--log-level", "loud")])
def test_a_bad_flag_is_refused_before_it_reaches_a_unit(flags: tuple[str, ...], tmp_path: Path) -> None:
    result = run_nattool("serve", "--print-unit", *flags, home=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == "" and result.stderr.startswith("nattool: error: "), result
    assert result.stderr.count("\n") == 1, result


@needs_systemd
@pytest.mark.parametrize(
    "flags", [(), ("--store", "sqlite:/var/lib/my state/t%1$x.db", "--host", "[::1]", "--log-level", "critical")]
)
def test_systemd_accepts_the_unit_and_rates_it_hardened(flags: tuple[str, ...], tmp_path: Path) -> None:
    unit = tmp_path / "nattool.service"
    # verify checks that ExecStart's program exists: it is this Python.
    unit.write_text(unit_text(tmp_path, *flags))
    # --man=no: the Documentation= page is installed by pip, not on this machine.
    verify = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for nattool.service: ([0-9.]+)", security.stdout + security.stderr)
    assert match, security.stdout[-2000:] + security.stderr[-2000:]
    assert float(match.group(1)) <= 2.0, security.stdout[-3000:]
