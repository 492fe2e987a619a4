"""One exit-code contract for every command (README "Exit codes", man page EXIT STATUS):

    0 ok · 1 failure · 2 usage (flags, arguments, configuration) · 3 timeout (no answer)
    4 unreachable (cannot resolve) · 5 state store · 130 interrupted

The command list comes from the live CLI, so a newly registered command is held to the
same contract; commands that talk to trackers must be listed in NETWORK below (a test
fails until they are). Plus --version, -q/-v, NO_COLOR and plain piped output.
Only loopback is ever contacted; names resolve on a loopback DNS server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from conftest import TrackerProcess, free_udp_port, nattool_cmd, nattool_env, run_nattool
from loopback_dns import LoopbackDNS
from nattool import __version__
from nattool.cli import docgen
from nattool.exit_codes import ExitCode
from tests.natlab.lab import PREFIX as NATLAB_PREFIX

ANSI_RE = re.compile(r"\x1b[\[\]()]")
COLOUR_SGR_RE = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")

TREE = docgen.cli_tree()
LEAVES = {" ".join(c.path): c for c in TREE.leaves()}

# Values for required arguments, by metavar, so that every command can be started.
PLACEHOLDER = {"GROUP": "exit-codes", "TARGET": "127.0.0.1:9"}

# How each command that talks to trackers/servers is pointed at ``{target}`` (HOST:PORT)
# with a short time budget. A command with --tracker missing here fails
# test_every_network_command_is_covered: add its row.
NETWORK: dict[str, list[str]] = {
    "whoami": ["whoami", "-t", "{target}", "--timeout", "1"],
    "trackers": ["trackers", "-t", "{target}", "--timeout", "1"],
    "register": ["register", "exit-codes", "-t", "{target}", "--timeout", "1", "--lan", "0", "--id", "0"],
    "probe": ["probe", "{target}", "--timeout", "0.5"],
    "connect": ["connect", "exit-codes", "-t", "{target}", "--timeout", "1", "--once", "-p", "0"],
}
# Commands whose target must be an address (no name resolution by design).
ADDRESS_ONLY = {"bench"}
BENCH = ["bench", "{target}", "--duration", "1", "--warmup", "0"]


def required_args(path: str) -> list[str]:
    cmd = LEAVES[path]
    out = []
    for arg in cmd.arguments:
        if arg.required:
            assert arg.name.upper() in PLACEHOLDER, f"add a PLACEHOLDER for {cmd.name}'s argument {arg.name}"
            out.append(PLACEHOLDER[arg.name.upper()])
    return out


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (result.args, result.returncode, result.stdout[-500:], result.stderr[-1500:])
    assert "Traceback" not in result.stderr, result.stderr


def test_the_codes_are_the_documented_ones() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0, "FAILURE": 1, "USAGE": 2, "TIMEOUT": 3, "UNREACHABLE": 4, "STORE": 5, "INTERRUPTED": 130,
    }


def test_version(nattool_home: Path) -> None:
    result = run_nattool("--version", home=nattool_home)
    assert result.returncode == 0 and result.stdout == f"nattool {__version__}\n" and result.stderr == ""


# -- 0 and 2 for every command: help, unknown options, missing arguments, bad config -------------


def run_all(argvs: dict[str, list[str]], home: Path, env_extra: dict[str, str] | None = None, timeout: float = 30) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several `nattool` commands concurrently (each is an interpreter start-up)."""
    env = nattool_env(home, **(env_extra or {}))
    procs = {
        key: subprocess.Popen(nattool_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
        for key, argv in argvs.items()
    }
    out = {}
    for key, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{argvs[key]} did not finish within {timeout}s: {stdout[-500:]} {stderr[-500:]}")
        out[key] = subprocess.CompletedProcess(argvs[key], proc.returncode, stdout, stderr)
    return out


def test_help_is_0_and_plain_for_every_command(nattool_home: Path) -> None:
    argvs = {f"{path} --help": [*path.split(), "--help"] for path in LEAVES}
    argvs.update({f"{' '.join(c.path)} -h": [*c.path, "-h"] for c in TREE.walk() if c.subcommands})
    for key, result in run_all(argvs, nattool_home).items():
        assert_clean_failure(result, 0)
        assert result.stdout.startswith(f"Usage: nattool {key.rsplit(' ', 1)[0]}".rstrip()), (key, result.stdout[:200])
        assert not ANSI_RE.search(result.stdout), key


def test_unknown_option_is_2_for_every_command(nattool_home: Path) -> None:
    argvs = {path: [*path.split(), *required_args(path), "--no-such-option"] for path in LEAVES}
    argvs["(global)"] = ["--no-such-option", "config", "path"]
    for key, result in run_all(argvs, nattool_home).items():
        assert_clean_failure(result, 2)
        assert "--no-such-option" in result.stderr, (key, result.stderr)
        assert result.stdout == "", key


def test_unknown_command_is_2(nattool_home: Path) -> None:
    results = run_all({"top": ["no-such-command"], "nested": ["config", "no-such-command"]}, nattool_home)
    for result in results.values():
        assert_clean_failure(result, 2)


def test_missing_required_argument_is_2(nattool_home: Path) -> None:
    argvs = {path: path.split() for path, cmd in LEAVES.items() if any(a.required for a in cmd.arguments)}
    assert argvs, "no command has a required argument: this test checks nothing"
    for result in run_all(argvs, nattool_home).values():
        assert_clean_failure(result, 2)


def _safe(path: str) -> list[str]:
    """Flags that keep a command harmless if it wrongly went ahead (loopback, no files)."""
    if path == "serve":
        return ["--host", "127.0.0.1", "--port", "0", "--store", "memory"]
    if path in NETWORK:
        return ["-t", "127.0.0.1:9"] if path != "probe" else ["127.0.0.1:9"]
    return []


def test_bad_configuration_is_2_for_every_command(nattool_home: Path, tmp_path: Path) -> None:
    # `config path` only names the file (it may not exist yet), it never reads it.
    with_config = [p for p, c in LEAVES.items() if "--config" in c.option_names() and p != "config path"]
    assert with_config
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("trackers = [\n")
    bad_value = tmp_path / "bad-value.toml"
    bad_value.write_text('timeout = "soon"\n')
    argvs = {}
    for path in with_config:
        base = [*path.split(), *required_args(path), *_safe(path)]
        argvs[f"{path}: missing file"] = [*base, "--config", str(tmp_path / "missing.toml")]
    argvs["bad toml"] = ["whoami", "-t", "127.0.0.1:9", "--config", str(bad_toml)]
    argvs["bad value"] = ["config", "show", "--config", str(bad_value)]
    results = run_all(argvs, nattool_home, timeout=20)
    results["bad env"] = run_nattool("whoami", "-t", "127.0.0.1:9", env=nattool_env(nattool_home, NATTOOL_RETRIES="many"))
    for key, result in results.items():
        assert_clean_failure(result, 2)
        assert result.stderr.startswith("nattool: error:"), (key, result.stderr)
    assert "NATTOOL_RETRIES" in results["bad env"].stderr
    assert "bad.toml" in results["bad toml"].stderr


# -- 3 and 4 for every command that talks to trackers -----------------------------------------------


def test_every_network_command_is_covered() -> None:
    talking = {p for p, c in LEAVES.items() if "--tracker" in c.option_names()}
    missing = talking - NETWORK.keys()
    assert not missing, f"add a NETWORK row (how to point it at a dead tracker) for: {sorted(missing)}"


def network_argvs(target: str) -> dict[str, list[str]]:
    argvs = {p: [a.replace("{target}", target) for a in argv] for p, argv in NETWORK.items() if p in LEAVES}
    return argvs


def test_no_answer_is_3(nattool_home: Path) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    argvs = network_argvs(dead)
    if "bench" in LEAVES:
        argvs["bench"] = [a.replace("{target}", dead) for a in BENCH]
    for key, result in run_all(argvs, nattool_home).items():
        assert_clean_failure(result, 3)


# Commands whose failures to send, bind or be accepted are ours to classify (connect has
# its own give-up rules).
CLIENTS = ("whoami", "trackers", "register", "probe")


@pytest.fixture
def loopback_only_netns(natlab_available: None) -> Iterator[str]:
    """A fresh network namespace with only loopback up: no route anywhere else, so a
    send fails in the kernel (ENETUNREACH) and nothing leaves the machine."""
    name = f"{NATLAB_PREFIX}-{os.getpid()}-noroute"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.mark.parametrize("target", ["192.0.2.1:9", "[2001:db8::1]:9"])
def test_no_route_is_4_not_a_timeout(nattool_home: Path, loopback_only_netns: str, target: str) -> None:
    argvs = {key: argv for key, argv in network_argvs(target).items() if key in CLIENTS}
    procs = {
        key: subprocess.Popen(
            ["ip", "netns", "exec", loopback_only_netns, *nattool_cmd(*argv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nattool_env(nattool_home),
        )
        for key, argv in argvs.items()
    }
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        result = subprocess.CompletedProcess(argvs[key], proc.returncode, out, err)
        assert_clean_failure(result, 4)
        assert "unreachable" in out + err, (key, out, err)
        assert "no answer" not in out + err, (key, out, err)


def test_bind_failure_is_4(nattool_home: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        port = str(taken.getsockname()[1])
        argvs = {
            "whoami": ["whoami", "-t", "127.0.0.1:9", "-p", port, "--timeout", "1"],
            "register": ["register", "g", "-t", "127.0.0.1:9", "-p", port, "--timeout", "1", "--lan", "0"],
        }
        for key, result in run_all(argvs, nattool_home).items():
            assert_clean_failure(result, 4)
            assert f"cannot open a UDP socket on port {port}" in result.stdout + result.stderr, (key, result)


def test_a_refusal_is_1(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    # A public endpoint with another IP than the request's source: the tracker says no.
    argv = ["register", "refused", "-t", shared_tracker.endpoint, "--public", "198.51.100.1:5", "--lan", "0"]
    result = run_nattool(*argv, home=nattool_home)
    assert_clean_failure(result, 1)
    assert f"tracker {shared_tracker.endpoint} refused: public ip differs" in result.stdout, result
    doc = json.loads(run_nattool(*argv, "--json", home=nattool_home).stdout)
    assert doc["self"] is None and "refused" in doc["trackers"][0]["error"]


ZONE = """
@    60 IN SOA ns.test. admin.test. 1 60 60 60 60
@    60 IN NS  ns.test.
ns   60 IN A   127.0.0.1
"""


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LoopbackDNS]:
    with LoopbackDNS(ZONE, origin="test.") as server:
        yield server


def test_unresolvable_name_is_4(nattool_home: Path, dns_server: LoopbackDNS) -> None:
    argvs = network_argvs("nowhere.test")
    argvs["whoami --domain"] = ["whoami", "--domain", "nowhere.test", "--timeout", "1"]
    before = dns_server.query_count()
    for key, result in run_all(argvs, nattool_home, {"NATTOOL_DNS_SERVER": dns_server.env_value}).items():
        assert_clean_failure(result, 4)
        assert "nowhere.test" in result.stderr, (key, result.stderr)
    assert dns_server.query_count() > before, "the commands never asked the loopback DNS server"


def test_bench_refuses_a_name_with_2(nattool_home: Path) -> None:
    if "bench" not in LEAVES:
        pytest.skip("no bench command")
    result = run_nattool(*[a.replace("{target}", "nowhere.test:9") for a in BENCH], home=nattool_home)
    assert_clean_failure(result, 2)


# -- -q / -v, and output for pipes and NO_COLOR -------------------------------------------------------


def test_quiet_and_verbose_are_accepted(nattool_home: Path) -> None:
    argvs = {
        flags: [*flags.split(), "config", "path"]
        for flags in ("-q", "--verbose", "-vv", "--quiet -v")
    }
    results = run_all(argvs, nattool_home)
    plain = run_nattool("config", "path", home=nattool_home)
    for key, result in results.items():
        assert_clean_failure(result, 0)
        assert result.stdout == plain.stdout, key


def test_quiet_prints_only_the_answer(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    loud = run_nattool("whoami", "-t", shared_tracker.endpoint, home=nattool_home)
    quiet = run_nattool("-q", "whoami", "-t", shared_tracker.endpoint, home=nattool_home)
    assert loud.returncode == 0 and quiet.returncode == 0, (loud, quiet)
    assert len(loud.stdout.splitlines()) > 1  # a table and a note: there is something to leave out
    # The answer alone: my public endpoint, one line, nothing on stderr.
    assert re.fullmatch(r"127\.0\.0\.1:\d+\n", quiet.stdout), repr(quiet.stdout)
    assert quiet.stderr == "", quiet.stderr


def test_piped_output_is_plain_for_every_network_command(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    """Without NO_COLOR but not on a terminal: no escape codes, no spinner (\\r) anywhere."""
    argvs = network_argvs(shared_tracker.endpoint)
    argvs.pop("connect", None)  # needs a second member to get anywhere; its timeout path is tested above
    argvs["config show"] = ["config", "show"]
    env = nattool_env(nattool_home)
    env.pop("NO_COLOR")
    env["TERM"] = "xterm-256color"
    procs = {k: subprocess.run(nattool_cmd(*v), capture_output=True, text=True, env=env, timeout=30) for k, v in argvs.items()}
    for key, result in procs.items():
        assert result.returncode in (0, 1), (key, result.returncode, result.stderr[-800:])
        assert result.stdout.strip(), key
        both = result.stdout + result.stderr
        assert not ANSI_RE.search(both) and "\r" not in both, (key, repr(both[:400]))


def spawn_tty(home: Path, *args: str, **env: str) -> tuple[str, int]:
    child = pexpect.spawn(
        sys.executable, ["-m", "nattool", *args], env=nattool_env(home, **env), timeout=20,
        encoding="utf-8", codec_errors="replace", dimensions=(50, 200),
    )
    child.expect(pexpect.EOF)
    out = child.before
    child.close()
    return out, int(child.exitstatus if child.exitstatus is not None else -1)


def test_no_color_on_a_terminal(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    coloured, _ = spawn_tty(nattool_home, "whoami", shared_tracker.endpoint, dead, "--timeout", "0.5", NO_COLOR="", TERM="xterm-256color", FORCE_COLOR="1")
    assert COLOUR_SGR_RE.search(coloured), "whoami shows no colour even when forced: the NO_COLOR check would be void"
    runs = [["whoami", shared_tracker.endpoint, dead, "--timeout", "0.5"], ["config", "show"], ["serve", "--help"]]
    for args in runs:
        out, _ = spawn_tty(nattool_home, *args, NO_COLOR="1", TERM="xterm-256color")
        assert out.strip(), args
        assert not COLOUR_SGR_RE.search(out), (args, repr(out[:300]))
