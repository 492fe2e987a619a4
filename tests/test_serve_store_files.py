"""What `nattool serve` leaves on disk, and what it says about a store it cannot use:
real `nattool serve` processes."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from conftest import nattool_cmd, nattool_env, run_nattool, start_tracker


def _one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert err.startswith("nattool: error: ") and "\n" not in err, err
    return err


def _tree(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def test_serve_that_cannot_bind_leaves_no_store_behind(tmp_path: Path) -> None:
    """The port is taken: serve fails with one line, and neither the default state
    directory nor a given --store path holds anything afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    given = tmp_path / "given"
    given.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = str(busy.getsockname()[1])
        for store in ("sqlite:", f"sqlite:{given / 'tracker.db'}"):
            result = run_nattool("serve", "--host", "127.0.0.1", "--port", port, "--store", store, home=home)
            assert "in use" in _one_line_error(result, 4), result.stderr
    assert _tree(home) == [], "serve left files in its home"
    assert _tree(given) == [], "serve left files beside --store"


def test_serve_that_served_keeps_its_private_state(tmp_path: Path) -> None:
    """A tracker that served keeps its state, in a directory of its own (0700) and
    files only its user can read (0600)."""
    home = tmp_path / "home"
    home.mkdir()
    tp = start_tracker(workdir=tmp_path / "logs", home=home, store="sqlite:")
    try:
        assert tp.ask(b"//51pwn/P2P&E2E/files-test/0/0/0") is not None  # a member to write down
    finally:
        assert tp.stop() == 0
    state = home / ".local" / "state" / "nattool"
    assert state.stat().st_mode & 0o777 == 0o700
    files = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
    assert "tracker.db" in files and "tracker.db.lock" in files, files
    assert {name: oct(mode) for name, mode in files.items() if mode != 0o600} == {}


@pytest.fixture
def without_redis(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import redis` fails as it does where the package is
    not installed."""
    shadow = tmp_path / "no-redis"
    shadow.mkdir()
    (shadow / "redis.py").write_text('raise ModuleNotFoundError("No module named \'redis\'", name="redis")\n')
    env = nattool_env(tmp_path / "home")
    env["PYTHONPATH"] = f"{shadow}:{env['PYTHONPATH']}"
    return env


@pytest.mark.parametrize(
    "args, store_env",
    [
        (["--store", "redis://127.0.0.1:6379/0"], None),
        (["--store", "rediss://127.0.0.1:6379/0"], None),
        (["--store", "valkey://127.0.0.1:6379/0"], None),
        (["--store", "valkey://127.0.0.1:6379/0", "--workers", "2"], None),
        ([], "redis://127.0.0.1:6379/0"),
    ],
)
def test_a_redis_store_without_the_redis_package_names_the_extra(
    without_redis: dict[str, str], args: list[str], store_env: str | None
) -> None:
    env = dict(without_redis)
    if store_env is not None:
        env["NATTOOL_STORE"] = store_env
    result = subprocess.run(
        nattool_cmd("serve", "--host", "127.0.0.1", "--port", "0", *args),
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    err = _one_line_error(result, 2)
    assert "pip install 'nattool[redis]'" in err, err
