"""The shipped systemd unit: printed by `nattool serve --print-unit`, accepted by
systemd's own checker, and hardened (systemd-analyze security)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_nattool

ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit_text(home: Path) -> str:
    result = run_nattool("serve", "--print-unit", home=home)
    assert result.returncode == 0, result
    return result.stdout


def test_unit_runs_the_tracker_unprivileged_with_its_state_directory(tmp_path: Path) -> None:
    text = unit_text(tmp_path)
    assert re.search(r"^ExecStart=\S*nattool serve --store sqlite:%S/nattool/tracker.db$", text, re.M)
    for line in ("DynamicUser=yes", "StateDirectory=nattool", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line


@needs_systemd
def test_systemd_accepts_the_unit_and_rates_it_hardened(tmp_path: Path) -> None:
    unit = tmp_path / "nattool.service"
    # verify checks that ExecStart's program exists: point it at this Python.
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m nattool", unit_text(tmp_path), flags=re.M))
    # --man=no: the Documentation= page is installed by pip, not on this machine.
    verify = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for nattool.service: ([0-9.]+)", security.stdout + security.stderr)
    assert match, security.stdout[-2000:] + security.stderr[-2000:]
    assert float(match.group(1)) <= 2.0, security.stdout[-3000:]
