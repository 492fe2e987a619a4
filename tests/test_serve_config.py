"""`nattool serve --config FILE`: the [serve] table of a TOML file sets the server's
options (same keys as the flags), flags win, and a bad file is a one-line error with
exit status 2 -- checked on real `nattool serve` processes."""

from __future__ import annotations

import inspect
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import BANNER_PREFIX, free_udp_port, nattool_cmd, nattool_env, udp_ask

REG = "//51pwn/P2P&E2E/"


class Serve:
    """`nattool serve` with exactly the given arguments (the shared `tracker` fixture
    always adds --port and --store, which is what these tests must not do)."""

    def __init__(self, workdir: Path, home: Path) -> None:
        self.workdir, self.home = workdir, home
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Start it and return its banner line."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        out_path = self.workdir / f"serve-{len(self.procs)}.out"
        err_path = self.workdir / f"serve-{len(self.procs)}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                nattool_cmd("serve", *args), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=nattool_env(self.home, **(env or {})), cwd=str(self.workdir),
            )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = out_path.read_text(errors="replace")
            if BANNER_PREFIX in text and "\n" in text:
                return text.splitlines()[0]
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no banner (exit {proc.poll()}): {err_path.read_text(errors='replace')[-2000:]}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                assert proc.wait(5) == 0, f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise


@pytest.fixture
def serve(tmp_path: Path, nattool_home: Path) -> Iterator[Serve]:
    runner = Serve(tmp_path / "run", nattool_home)
    yield runner
    runner.stop_all()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_serve_table_sets_port_store_and_ttl(serve: Serve, tmp_path: Path) -> None:
    port = free_udp_port()
    db = tmp_path / "from-config.db"
    cfg = write(
        tmp_path / "nattool.toml",
        f'[serve]\nhost = "127.0.0.1"\nport = {port}\nstore = "sqlite:{db}"\nttl = 7\nrate_limit = 0\n',
    )
    banner = serve.start("--config", str(cfg))
    assert f"udp 127.0.0.1:{port} " in banner, banner
    assert f"store sqlite:{db}," in banner and "ttl 7s" in banner and "rate limit off" in banner, banner
    assert udp_ask(b"//nat", ("127.0.0.1", port)) is not None
    reply = udp_ask(f"{REG}cfg-test/0/0/0".encode(), ("127.0.0.1", port))
    assert reply is not None and not reply.startswith(b"ERR")
    assert db.exists()


def test_flags_win_over_the_environment_and_the_file(serve: Serve, tmp_path: Path) -> None:
    file_port, flag_port = free_udp_port(), free_udp_port()
    cfg = write(
        tmp_path / "nattool.toml",
        f'[serve]\nhost = "127.0.0.1"\nport = {file_port}\nstore = "sqlite:{tmp_path / "no.db"}"\nttl = 7\n',
    )
    banner = serve.start("--config", str(cfg), "--port", str(flag_port), "--ttl", "9", "--store", "memory")
    assert f"udp 127.0.0.1:{flag_port} " in banner and "store memory" in banner and "ttl 9s" in banner, banner
    # Flags that were not given still come from the file.
    assert "rate limit 50/s" in banner
    assert udp_ask(b"//nat", ("127.0.0.1", flag_port)) is not None
    assert udp_ask(b"//nat", ("127.0.0.1", file_port), timeout=0.3) is None
    assert not (tmp_path / "no.db").exists()
    # The environment sits between the two (NATTOOL_STORE).
    env_port = free_udp_port()
    banner = serve.start("--config", str(cfg), "--port", str(env_port), env={"NATTOOL_STORE": "memory"})
    assert "store memory" in banner and "ttl 7s" in banner, banner


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[serve]\nttl = 7\nbogus = 1\n", "serve.bogus"),
        ('[serve]\nport = "x"\n', "serve.port"),
        ("[serve]\nttl = -3\n", "serve.ttl"),
        ("[server]\nport = 1\n", "server"),
        ("[serve\nport = 1\n", "TOML"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "unknown-table", "not-toml"],
)
def test_a_bad_config_file_is_one_line_and_exit_2(text: str, needle: str, tmp_path: Path, nattool_home: Path) -> None:
    cfg = write(tmp_path / "bad.toml", text)
    port = free_udp_port()
    res = subprocess.run(
        nattool_cmd("serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--store", "memory"),
        capture_output=True, text=True, timeout=20, env=nattool_env(nattool_home),
    )  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = res.stderr.strip()
    assert err.count("\n") == 0 and needle in err and str(cfg) in err, err
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_every_serve_flag_has_a_config_key() -> None:
    """'a config file with the same keys as the flags': each option of `serve` (but
    --config itself and --print-unit) is a serve.* key of the config schema."""
    from nattool.cli.serve_cmd import serve as serve_command
    from nattool.config import KEYS

    params = set(inspect.signature(serve_command).parameters) - {"config", "print_unit"}
    keys = {k.split(".", 1)[1] for k in KEYS if k.startswith("serve.")}
    assert params == keys, (sorted(params - keys), sorted(keys - params))
