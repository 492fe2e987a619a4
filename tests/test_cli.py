"""The real CLI, end to end: pexpect drives `nattool` on a terminal (the 2-minute tour),
subprocess pipes check errors, exit codes and plain output."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pexpect
import pytest

from conftest import TrackerProcess, free_udp_port, nattool_cmd, nattool_env, run_nattool, udp_socket
from nattool.client_defaults import DEFAULT_TIMEOUT

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ANSI_RE = re.compile(r"\x1b\[")
# SGR colour parameters: 30-37/39 (fg), 40-47/49 (bg), 90-97, 100-107, 38;5/38;2 …
COLOUR_SGR_RE = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")


def loose(text: str) -> str:
    """A regex for ``text`` as a terminal shows it: styles (bold …) may sit between any
    two characters (NO_COLOR removes colours, not bold)."""
    return r"(?:\x1b\[[0-9;]*m)*".join(re.escape(ch) for ch in text)


def spawn(home: Path, *args: str, timeout: float = 15, **env: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "nattool", *args],
        env=nattool_env(home, **env),
        timeout=timeout,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(50, 200),
    )


def finish(child: pexpect.spawn, timeout: float = 15) -> tuple[str, int]:
    """Wait for the end; return the output and the exit status."""
    child.expect(pexpect.EOF, timeout=timeout)
    out = child.before
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}: {out}"
    return out, child.exitstatus


def json_run(home: Path, *args: str) -> dict:  # type: ignore[type-arg]
    out, code = finish(spawn(home, *args, "--json"))
    assert code == 0, out
    assert "Traceback" not in out
    return json.loads(out)


# -- the 2-minute tour ---------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, nattool_home: Path):  # type: ignore[no-untyped-def]
    """`nattool serve` on a terminal, as the README's first terminal runs it."""
    servers: list[pexpect.spawn] = []

    def start(*extra: str) -> str:
        port = free_udp_port()
        child = spawn(nattool_home, "serve", "--host", "127.0.0.1", "--port", str(port), "--store", "memory", *extra)
        child.expect(r"nattool \S+ tracker listening on udp 127\.0\.0\.1:%d" % port, timeout=10)
        servers.append(child)
        return f"127.0.0.1:{port}"

    yield start
    for child in servers:
        child.kill(2)  # Ctrl-C, as a user stops it
        out, code = finish(child, 10)
        assert code == 130, out
        assert "Traceback" not in out
        assert "event=stopped" in out


def test_tour_whoami_register_trackers(served, nattool_home: Path) -> None:  # type: ignore[no-untyped-def]
    tracker = served()

    who = json_run(nattool_home, "whoami", tracker)
    assert set(who) >= {"endpoint", "answers"}
    assert re.fullmatch(r"127\.0\.0\.1:\d+", who["endpoint"])
    [answer] = who["answers"]
    assert answer["ok"] is True and answer["tracker"] == tracker and answer["endpoint"] == who["endpoint"]
    assert answer["rtt_ms"] is not None and answer["rtt_ms"] >= 0

    group = f"tour-{uuid.uuid4().hex[:8]}"
    first = json_run(nattool_home, "register", group, "-t", tracker, "--lan", "10.0.0.1", "--id", "0")
    assert set(first) >= {"group", "self", "members"}
    assert first["group"] == group
    assert first["members"] == []
    assert set(first["self"]) == {"endpoint", "lan"} and first["self"]["lan"] == ["10.0.0.1"]
    assert first["trackers"][0]["form"] == "seed"

    second = json_run(nattool_home, "register", group, "-t", tracker, "--lan", "10.0.0.2", "--id", "0")
    assert second["self"]["lan"] == ["10.0.0.2"]
    # Same public IP (127.0.0.1): the first member's LAN list is shown to the second.
    assert second["members"] == [{"endpoint": first["self"]["endpoint"], "lan": ["10.0.0.1"]}]

    # Human output of the same on a terminal.
    child = spawn(nattool_home, "register", group, "-t", tracker, "--lan", "0", "--id", "0")
    child.expect(loose(f"group {group}: registered as 127.0.0.1:"))
    out, code = finish(child)
    assert code == 0 and first["self"]["endpoint"] in out and second["self"]["endpoint"] in out

    child = spawn(nattool_home, "trackers", "-t", tracker)
    child.expect(r"\(none\)")
    child.expect(r"1 tracker\(s\): " + re.escape(tracker))
    assert finish(child)[1] == 0


def test_register_new_prints_a_uuid(served, nattool_home: Path) -> None:  # type: ignore[no-untyped-def]
    tracker = served()
    child = spawn(nattool_home, "register", "new", "-t", tracker, "--lan", "0", "--id", "0")
    child.expect(r"new group: (" + UUID_RE.pattern + ")")
    group = child.match.group(1)
    child.expect(loose(f"group {group}: registered as"))
    assert finish(child)[1] == 0
    # --json: the new group is in the document (the note goes to stderr).
    result = run_nattool("register", "new", "-t", tracker, "--json", "--lan", "0", "--id", "0", home=nattool_home)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert UUID_RE.fullmatch(doc["group"])
    assert doc["group"] in result.stderr


def test_keepalive_shows_members_joining_and_leaving(served, nattool_home: Path) -> None:  # type: ignore[no-untyped-def]
    tracker = served("--ttl", "1")
    group = f"ka-{uuid.uuid4().hex[:8]}"
    watcher = spawn(nattool_home, "register", group, "-t", tracker, "--keepalive", "1", "--lan", "0", "--id", "0")
    watcher.expect(loose(f"registered in {group} as 127.0.0.1:"))
    visitor = json_run(nattool_home, "register", group, "-t", tracker, "--lan", "0", "--id", "0")
    ep = re.escape(visitor["self"]["endpoint"])
    watcher.expect(r"\+ " + ep, timeout=5)
    # The visitor never re-registers: gone after the TTL.
    watcher.expect(r"- " + ep, timeout=6)
    watcher.sendintr()
    out, code = finish(watcher, 10)
    assert code == 130, out
    assert "Traceback" not in out


# -- errors ----------------------------------------------------------------------------------------


def assert_one_line_error(result, code: int | None = None) -> str:  # type: ignore[no-untyped-def]
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code, (result.returncode, err)
    assert err.startswith("nattool: error: "), err
    assert "\n" not in err, err
    return err


BAD_INPUT = [
    ["register", "bad group!", "-t", "127.0.0.1:9"],
    ["register", "g" * 65, "-t", "127.0.0.1:9"],
    ["register", "g", "-t", "127.0.0.1:9", "--public", "1.2.3"],
    ["register", "g", "-t", "127.0.0.1:9", "--public", "127.0.0.1:0"],
    ["register", "g", "-t", "127.0.0.1:9", "--lan", "10.0.0.300"],
    ["register", "g", "-t", "127.0.0.1:9", "--lan", ",".join(f"10.0.0.{i}" for i in range(17))],
    ["register", "g", "-t", "127.0.0.1:9", "--id", "not-a-mac"],
    ["register", "g", "-t", "127.0.0.1:9", "--keepalive", "0"],
    ["whoami", "[::1"],
    ["whoami", "-t", "127.0.0.1:99999"],
    ["trackers", "-t", "127.0.0.1:"],
    ["whoami", "127.0.0.1:9", "--timeout", "0"],
    ["whoami", "-t", "::1:4328"],
    ["probe", "127.0.0.1:9", "--lifetime-max", "0"],
    ["probe", "127.0.0.1:9", "--timeout", "0.1"],
    ["probe", "127.0.0.1:9", "--retries", "21"],
    ["serve", "--port", "70000"],
    ["serve", "--host", "not-an-ip", "--port", "0"],
    ["serve", "--store", "bogus", "--host", "127.0.0.1", "--port", "0"],
    ["serve", "--log-level", "chatty", "--host", "127.0.0.1", "--port", "0"],
]


@pytest.fixture(scope="module")
def bad_input_runs(nattool_home: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every BAD_INPUT command, run concurrently once (start-up time dominates)."""
    procs = {
        " ".join(args): subprocess.Popen(
            nattool_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nattool_env(nattool_home)
        )
        for args in BAD_INPUT
    }
    done = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.xdist_group("cli_bad_input")  # one lane: the fixture runs every command
@pytest.mark.parametrize("args", BAD_INPUT, ids=lambda a: " ".join(a)[:50])
def test_bad_input_is_a_one_line_usage_error(args: list[str], bad_input_runs) -> None:  # type: ignore[no-untyped-def]
    result = bad_input_runs[" ".join(args)]
    assert_one_line_error(result, 2)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["whoami", "-t", "127.0.0.1:99999"], "bad tracker '127.0.0.1:99999': port 99999 out of range 1..65535"),
        (["register", "g", "-t", "127.0.0.1:0"], "bad tracker '127.0.0.1:0': port 0 out of range 1..65535"),
        (
            ["whoami", "-t", "::1:4328"],
            "bad tracker '::1:4328': ambiguous; write [::1]:4328 for port 4328, or [::1:4328] for the address",
        ),
        (["probe", "stun:::1:3478"], "bad tracker 'stun:::1:3478': ambiguous; write [::1]:3478 for port 3478"),
        (["probe", "127.0.0.1:9", "--lifetime-max", "0"], "--lifetime-max must be in 1..600 seconds, got 0"),
    ],
)
def test_bad_tracker_and_probe_arguments_say_what_is_wrong(
    args: list[str], message: str, bad_input_runs, nattool_home: Path  # type: ignore[no-untyped-def]
) -> None:
    key = " ".join(args)
    result = bad_input_runs[key] if key in bad_input_runs else run_nattool(*args, home=nattool_home)
    err = assert_one_line_error(result, 2)
    assert message in err, err
    assert "expected a list" not in err


def test_probe_takes_timeout_and_retries(nattool_home: Path) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    started = time.monotonic()
    result = run_nattool("probe", "-4", dead, "--timeout", "0.4", "--retries", "1", "--json", home=nattool_home)
    assert result.returncode == 3, result
    doc = json.loads(result.stdout)
    sent = [t["attempts"] for t in doc["servers"][0]["transactions"]]
    assert sent and set(sent) == {2}, sent  # one send and one retransmission each
    assert time.monotonic() - started < 20


def test_no_tracker_says_how_to_give_one(nattool_home: Path) -> None:
    for command in ("whoami", "trackers"):
        err = assert_one_line_error(run_nattool(command, home=nattool_home), 2)
        assert "--tracker" in err and "NATTOOL_TRACKERS" in err
    err = assert_one_line_error(run_nattool("register", "g", home=nattool_home), 2)
    assert "--tracker" in err


def test_trackers_from_the_environment(served, nattool_home: Path) -> None:  # type: ignore[no-untyped-def]
    tracker = served()
    result = run_nattool("whoami", "--json", env=nattool_env(nattool_home, NATTOOL_TRACKERS=tracker))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["answers"][0]["tracker"] == tracker


class BlackHole:
    """A tracker that never answers; notes when the first request came, so that the
    time a command waits is measured without the interpreter's start-up."""

    def __init__(self) -> None:
        self.sock = udp_socket("127.0.0.1", timeout=0.05)
        self.endpoint = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.first: float | None = None
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.count += 1
            if self.first is None:
                self.first = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_unreachable_tracker_exits_3_within_the_timeout(nattool_home: Path) -> None:
    """Every client command gives up after --timeout (retries included), exit 3.
    The timeout is twice the default, so a command that ignored it would end early:
    that lower bound holds however loaded the machine is; the upper one is loose."""
    timeout = 2 * DEFAULT_TIMEOUT
    commands = {
        "whoami": ["whoami"],
        "trackers": ["trackers"],
        "register": ["register", "g", "--lan", "0", "--id", "0"],
    }
    holes = {name: BlackHole() for name in commands}
    try:
        procs = {
            name: subprocess.Popen(  # concurrently: the test waits once
                nattool_cmd(*command, "-t", holes[name].endpoint, "--timeout", str(timeout)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nattool_env(nattool_home),
            )
            for name, command in commands.items()
        }
        off = []
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=30)
            ended = time.monotonic()
            hole = holes[name]
            assert proc.returncode == 3, (name, proc.returncode, out, err)
            assert "Traceback" not in err
            assert hole.endpoint in out + err
            assert hole.first is not None and hole.count >= 2, "no retransmission"
            waited = ended - hole.first
            # The command's clock starts just before its first datagram; process exit is
            # included at the top, with room for a loaded 2-core machine.
            if not timeout - 0.3 <= waited <= timeout + 3.0:
                off.append(f"{name} waited {waited:.2f}s with --timeout {timeout:g} ({hole.count} datagrams)")
        assert not off, off
    finally:
        for hole in holes.values():
            hole.close()


def test_serve_on_a_port_in_use_is_a_clear_error(nattool_home: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = run_nattool("serve", "--host", "127.0.0.1", "--port", str(port), "--store", "memory", home=nattool_home)
    err = assert_one_line_error(result)
    assert f"127.0.0.1:{port}" in err and "in use" in err
    assert "tracker listening" not in result.stdout


def test_option_parse_errors_are_one_line_too(nattool_home: Path) -> None:
    """Typer/click's own parse errors (a number that is not a number, an unknown
    option) should look like every other error: one line, "nattool: error: ..."."""
    for args in (["whoami", "127.0.0.1:9", "--timeout", "abc"], ["serve", "--port", "abc"], ["whoami", "--no-such-flag"]):
        result = run_nattool(*args, home=nattool_home)
        assert result.returncode == 2, result
        assert_one_line_error(result, 2)


# -- version and plain output ---------------------------------------------------------------------------


def test_version(nattool_home: Path) -> None:
    import nattool

    result = run_nattool("--version", home=nattool_home)
    assert result.returncode == 0
    assert result.stdout.strip() == f"nattool {nattool.__version__}"
    out, code = finish(spawn(nattool_home, "--version"))
    assert code == 0 and out.strip() == f"nattool {nattool.__version__}"


def test_piped_output_has_no_escape_codes(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    for expected, args in (
        (shared_tracker.endpoint, ["whoami", shared_tracker.endpoint, dead, "--timeout", "0.2"]),  # a red cell too
        ("pipe-test: registered as", ["register", "pipe-test", "-t", shared_tracker.endpoint, "--lan", "0", "--id", "0"]),
        (shared_tracker.endpoint, ["trackers", "-t", shared_tracker.endpoint]),
    ):
        # Piped, and without NO_COLOR: still plain.
        env = nattool_env(nattool_home)
        env.pop("NO_COLOR")
        result = run_nattool(*args, env=env)
        assert expected in result.stdout, result
        assert not ANSI_RE.search(result.stdout + result.stderr), repr(result.stdout)


def test_no_color_on_a_terminal(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    args = ("whoami", shared_tracker.endpoint, dead, "--timeout", "0.2")
    coloured, _ = finish(spawn(nattool_home, *args, NO_COLOR="", TERM="xterm-256color", FORCE_COLOR="1"))
    # Proof that the command does colour its output on a terminal (else this test is void).
    assert COLOUR_SGR_RE.search(coloured), repr(coloured)
    plain, _ = finish(spawn(nattool_home, *args, NO_COLOR="1", TERM="xterm-256color"))
    assert shared_tracker.endpoint in plain
    assert not COLOUR_SGR_RE.search(plain), repr(plain)
