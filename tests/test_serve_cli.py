"""`nattool serve` as its user meets it: how it stops (Ctrl-C is 130 as for every
command, systemd's SIGTERM a clean 0), its log levels, and the addresses it listens on,
each on a real `nattool serve` process."""

from __future__ import annotations

import ast
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from conftest import REPO, TrackerProcess, free_udp_port, nattool_cmd, nattool_env, run_nattool, start_tracker, udp_ask

REG = "//51pwn/P2P&E2E/"


def _free_udp6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


def _stop_summary(log: str) -> list[str]:
    return [line for line in log.splitlines() if "event=stopped" in line]


# -- how it stops ---------------------------------------------------------------------------


def _ctrl_c(nattool_home: Path, *args: str) -> tuple[str, int]:
    """Start `nattool serve ARGS` on a terminal, register one member, press Ctrl-C (the
    terminal sends SIGINT to the whole foreground group, worker processes included);
    return the output and the exit status."""
    port = free_udp_port()
    child = pexpect.spawn(
        sys.executable, ["-m", "nattool", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env=nattool_env(nattool_home), timeout=20, encoding="utf-8", codec_errors="replace",
    )  # fmt: skip
    try:
        child.expect(r"tracker listening on udp 127\.0\.0\.1:%d" % port)
        reply = udp_ask(f"{REG}ctrl-c/0/0/0".encode(), ("127.0.0.1", port), timeout=5)
        assert reply is not None and not reply.startswith(b"ERR"), reply
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return child.before, child.exitstatus


def test_ctrl_c_exits_130_after_the_stop_summary(nattool_home: Path) -> None:
    out, code = _ctrl_c(nattool_home, "--store", "memory")
    assert code == 130, out
    assert "Traceback" not in out
    summary = _stop_summary(out)
    assert len(summary) == 1 and "register=1" in summary[0], out


def test_ctrl_c_stops_every_worker_and_exits_130(nattool_home: Path, tmp_path: Path) -> None:
    out, code = _ctrl_c(nattool_home, "--store", f"sqlite:{tmp_path / 'w.db'}", "--workers", "2")
    assert code == 130, out
    assert "Traceback" not in out
    summary = _stop_summary(out)
    assert sorted(line.split("worker=")[1][0] for line in summary) == ["0", "1"], out
    assert sum(int(line.split("register=")[1].split()[0]) for line in summary if "register=" in line) == 1, out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_is_a_clean_stop(workers: str, nattool_home: Path, tmp_path: Path) -> None:
    """systemd stops a service with SIGTERM: exit 0, or it counts as a failure."""
    store = f"sqlite:{tmp_path / 't.db'}"
    tp: TrackerProcess = start_tracker("--workers", workers, workdir=tmp_path, home=nattool_home, store=store)
    assert tp.ask(f"{REG}sigterm/0/0/0".encode()) is not None
    assert tp.stop() == 0, tp.stderr()
    assert "Traceback" not in tp.stderr()
    assert len(_stop_summary(tp.stderr())) == int(workers), tp.stderr()


# -- log levels -----------------------------------------------------------------------------


def test_log_level_critical_works_from_the_flag_and_the_config_file(nattool_home: Path, tmp_path: Path) -> None:
    """Every level the config file accepts, the flag accepts, and it means the same:
    at critical the stop summary (an info line) is not logged; at debug it is."""
    cfg = tmp_path / "critical.toml"
    cfg.write_text('[serve]\nlog_level = "critical"\n')
    for args in (["--log-level", "critical"], ["--config", str(cfg)], ["--log-level", "CRITICAL"]):
        tp = start_tracker(*args, workdir=tmp_path / "critical", home=nattool_home)
        assert tp.stop() == 0, tp.stderr()
        assert tp.stderr() == "", (args, tp.stderr())
    tp = start_tracker("--log-level", "debug", workdir=tmp_path / "debug", home=nattool_home)
    assert tp.stop() == 0 and len(_stop_summary(tp.stderr())) == 1, tp.stderr()


def test_a_bad_log_level_is_refused_alike_from_the_flag_and_the_file(nattool_home: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "loud.toml"
    cfg.write_text('[serve]\nlog_level = "loud"\n')
    common = ("--host", "127.0.0.1", "--port", "0", "--store", "memory")
    for args in (["--log-level", "loud"], ["--config", str(cfg)]):
        result = run_nattool("serve", *common, *args, home=nattool_home)
        assert result.returncode == 2, result
        err = result.stderr.strip()
        assert err.count("\n") == 0 and "debug, info, warning, error, critical" in err and "loud" in err, err
        assert result.stdout == ""


def test_nothing_below_the_command_line_imports_it() -> None:
    """The floors: nattool/cli sits on top, so no other module imports from it (the
    worker processes set up logging from nattool.logs)."""
    package = REPO / "nattool"
    offenders = []
    for path in package.rglob("*.py"):
        if path.parent == package / "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            cli = [name for name in names if name == "nattool.cli" or name.startswith("nattool.cli.")]
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in cli]
    assert offenders == []
    # And a worker process's imports, as run, load no CLI module.
    probe = "import sys, nattool.net.workers; print(sorted(m for m in sys.modules if m.startswith('nattool.cli')))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=nattool_env(), timeout=30
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result


# -- where it listens ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["[::1]", "::1"])
def test_an_ipv6_host_with_or_without_brackets(host: str, nattool_home: Path, tmp_path: Path) -> None:
    """Clients write [::1]; serve takes the same spelling, on the flag and in the file."""
    port = _free_udp6_port()
    tp = start_tracker(workdir=tmp_path, home=nattool_home, host=host, port=port)
    try:
        assert f"udp [::1]:{port} " in tp.banner, tp.banner
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
            sock.settimeout(5)
            sock.sendto(b"//nat", ("::1", port))
            assert sock.recv(100) == f"[::1]:{sock.getsockname()[1]}".encode()
    finally:
        assert tp.stop() == 0, tp.stderr()
    cfg = tmp_path / "v6.toml"
    cfg.write_text(f'[serve]\nhost = "{host}"\nport = {port}\nstore = "memory"\n')
    proc = subprocess.Popen(
        nattool_cmd("serve", "--config", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=nattool_env(nattool_home),
    )  # fmt: skip
    assert proc.stdout is not None
    banner = proc.stdout.readline()  # the banner, or "" when it exits instead
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert f"udp [::1]:{port} " in banner and proc.returncode == 0, err


@pytest.mark.parametrize(
    "flag, value, hint",
    [
        ("--host", "[127.0.0.1]", ""),
        ("--host", "not-an-ip", ""),
        ("--host", "[::1", ""),
        ("--host", "[::1]:4328", " (the port goes in --port)"),
        ("--host", "127.0.0.1:4328", " (the port goes in --port)"),
        ("--alt-host", "[::2]:9", " (the port goes in --alt-port)"),
    ],
)
def test_a_bad_host_is_one_line_and_exit_2(flag: str, value: str, hint: str, nattool_home: Path) -> None:
    extra = ["--host", "::1"] if flag == "--alt-host" else []
    result = subprocess.run(
        nattool_cmd("serve", *extra, flag, value, "--port", "0", "--store", "memory"),
        capture_output=True, text=True, timeout=30, env=nattool_env(nattool_home),
    )  # fmt: skip
    assert result.returncode == 2, result
    want = "want an IPv4 or IPv6 address such as 0.0.0.0, :: or [::1]"
    assert result.stderr == f"nattool: error: bad {flag} {value!r}: {want}{hint}\n"
    assert result.stdout == ""
