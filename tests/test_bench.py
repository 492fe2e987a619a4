"""`nattool bench`: loss, invalid replies, real servers, the CLI.

Fake servers are small blocking responders in a child process (this file run as a
script), each misbehaving in one deterministic way. Everything stays on loopback.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import typer
from typer.testing import CliRunner

from nattool.diag.bench import BenchConfig, BenchReport, GeneratorLoad, parse_mix, parse_target, run_bench, run_ramp
from nattool.diag.bench_engine import EngineResult, Progress, register_request, stun_request, xor_mapped_value
from nattool.errors import UsageError
from nattool.exit_codes import ExitCode
from nattool.protocol import stun as stun_codec
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import MemberList, parse_request

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# -- a misbehaving responder ---------------------------------------------------------


def fake_server(mode: str) -> None:
    """Answer //nat, Binding requests and seed-form registrations; ``mode`` says how
    to go wrong: ok, drop10 (every 10th request unanswered), wrong-endpoint,
    wrong-txid, garbage, bad-list (a registration reply whose own line is right
    but whose second line is no endpoint); slow answers right, 20 ms late."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    n = 0
    deadline = time.monotonic() + 60  # never outlives a test run
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            data, addr = sock.recvfrom(2048)
        except socket.timeout:
            continue
        n += 1
        if mode == "drop10" and n % 10 == 0:
            continue
        if mode == "slow":
            time.sleep(0.020)
        host, port = addr[0], addr[1]
        if mode == "wrong-endpoint":
            port = port + 1 if port < 65535 else 1
        ep = Endpoint.from_text(f"{host}:{port}")
        if mode == "garbage":
            reply = b"\x00\xffgarbage"
        elif data == b"//nat":
            reply = ep.to_text().encode()
        elif stun_codec.is_stun(data):
            txid = stun_codec.parse(data).transaction_id
            if mode == "wrong-txid":
                txid = bytes(b ^ 0x55 for b in txid)
            msg = stun_codec.StunMessage(
                stun_codec.MsgClass.SUCCESS, stun_codec.Method.BINDING, txid, (stun_codec.XorMappedAddress(ep),)
            )
            reply = msg.to_wire()
        else:
            req = parse_request(data)
            lan = ",".join(req.lan)  # type: ignore[union-attr]
            other = "198.51.100.7:4000;" if mode == "bad-list" else "198.51.100.7:4000"
            reply = f"{ep.to_text()};{lan}\n{other}".encode()
        sock.sendto(reply, addr)


@pytest.fixture
def fake() -> Iterator["callable[[str], Endpoint]"]:
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str) -> Endpoint:
        proc = subprocess.Popen(
            [sys.executable, str(HERE), "fake-server", mode],
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        procs.append(proc)
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        return Endpoint.from_text(f"127.0.0.1:{port}")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(5)


def quick(target: Endpoint, mix: str = "nat=1", **kw: object) -> BenchConfig:
    opts: dict[str, object] = dict(
        target=target,
        mix=parse_mix(mix),
        sockets=32,
        window=8,
        duration=0.5,
        warmup=0.1,
        timeout=0.2,
        members=200,
        groups=20,
    )
    opts.update(kw)
    return BenchConfig(**opts)  # type: ignore[arg-type]


# -- loss and invalid replies ------------------------------------------------------------


@pytest.mark.parametrize("mix", ["nat=1", "stun=1", "register=1"])
def test_a_server_that_drops_every_tenth_request_shows_ten_percent_loss(fake, mix: str) -> None:
    report = run_bench(quick(fake("drop10"), mix, sockets=64, window=32, timeout=0.1))
    r = report.result
    assert r.sent > 300
    assert r.invalid == 0
    assert 0.07 <= report.loss_ratio <= 0.13, report.to_json()
    assert r.answered + r.lost == r.sent


@pytest.mark.parametrize(
    "mode,mix,reason",
    [
        ("wrong-endpoint", "nat=1", "nat: not our endpoint"),
        ("wrong-endpoint", "stun=1", "stun: wrong mapped address"),
        ("wrong-endpoint", "register=1", "register: not our own line first"),
        ("wrong-txid", "stun=1", "stun: wrong transaction id"),
        ("garbage", "nat=1", "nat: not our endpoint"),
        ("garbage", "stun=1", "stun: bad reply"),
        ("garbage", "register=1", "register: not our own line first"),
        ("bad-list", "register=1", "register: not a member list"),
    ],
)
def test_wrong_replies_are_invalid_not_answered(fake, mode: str, mix: str, reason: str) -> None:
    report = run_bench(quick(fake(mode), mix))
    r = report.result
    assert r.sent > 100
    assert r.answered == 0
    assert r.invalid == r.sent - r.lost and r.lost <= 2
    assert r.invalid_reasons == {reason: r.invalid}


def test_a_correct_fake_is_all_answered(fake) -> None:
    # The control for the two tests above: same fake, no fault, nothing invalid.
    report = run_bench(quick(fake("ok"), "nat=1,stun=1,register=2"))
    r = report.result
    assert r.sent > 300 and r.answered == r.sent and r.invalid == 0 and r.lost == 0
    assert set(r.by_kind) == {"nat", "stun", "register"}


def test_open_loop_holds_the_rate(fake) -> None:
    report = run_bench(quick(fake("ok"), rate=2000.0, window=None, duration=1.0))
    # A starved generator (a loaded machine) must say so rather than quietly offer less.
    assert 1800 <= report.offered_rate <= 2100 or (
        report.offered_rate < 1800 and (report.generator_limited or report.result.skipped)
    ), report.to_json()
    assert report.result.answered == report.result.sent


def test_open_loop_counts_the_requests_it_sent_late(fake) -> None:
    """A generator that stalls catches up in a burst: those requests are counted late,
    so that the latency of the server's answer to a burst is not taken for its own."""
    stalled: list[float] = []

    def stall(p: Progress) -> None:
        if p.phase == "run" and not stalled:
            stalled.append(0.06)
            time.sleep(0.06)  # 120 slots at 2,000/s: 56 skipped, the last 64 sent at once

    report = run_bench(quick(fake("ok"), rate=2000.0, window=None, sockets=128, duration=1.5), progress=stall)
    assert stalled, "the run never reached its measured phase"
    r = report.result
    assert 50 <= r.late <= r.sent, report.to_json()
    assert report.to_json()["late"] == r.late


def test_open_loop_latency_is_the_servers_delay(fake) -> None:
    """Open loop on Linux times replies by the kernel's receive timestamp: the
    figure must be the server's real delay, not zero, and not a clock mix-up."""
    report = run_bench(quick(fake("slow"), rate=20.0, window=None, duration=1.0, timeout=0.5))
    doc = report.to_json()
    assert report.result.answered == report.result.sent > 10, doc
    if sys.platform.startswith("linux"):
        assert doc["latency_ms"]["clock"] == "kernel"
    assert 20.0 <= doc["latency_ms"]["min"] and doc["latency_ms"]["p50"] < 60.0, doc["latency_ms"]


def test_several_processes_merge(fake) -> None:
    report = run_bench(quick(fake("drop10"), processes=2, sockets=64, window=32, timeout=0.1))
    assert report.result.sent > 300
    assert len(report.processes_cpu) == 2
    assert 0.07 <= report.loss_ratio <= 0.13
    assert report.result.histogram.count == report.result.answered


# -- against the real tracker ----------------------------------------------------------------


@pytest.mark.parametrize("mix", ["nat=1", "stun=1", "register=1", "nat=1,register=3,trackers=1"])
def test_real_tracker_short_run_is_clean(shared_tracker, mix: str) -> None:
    tp = shared_tracker  # memory store, --rate-limit 0
    report = run_bench(
        quick(Endpoint.from_text(tp.endpoint), mix, sockets=64, window=16, duration=1.0, warmup=0.2, timeout=1.0, groups=100, members=1000)
    )
    r = report.result
    assert r.invalid == 0, dict(r.invalid_reasons)
    assert r.sent > 1000
    assert r.lost <= r.sent * 0.001
    assert r.answered >= r.sent * 0.999
    s = r.histogram.summary()
    assert 0 < s.min <= s.p50 <= s.p99 <= s.max


@pytest.mark.parametrize("window", [4, None])
def test_every_member_is_registered_from_every_socket_in_turn(shared_tracker, window: int | None) -> None:
    """--members M over --sockets S means all M, whatever the window: a closed loop
    that reused the sockets answered first registered a fraction of them (about
    window x M/S), so groups looked smaller than asked and replies were cheaper."""
    tp = shared_tracker
    target = Endpoint.from_text(tp.endpoint)
    seed, groups, members = 4242, 20, 200
    load = {"window": window} if window else {"window": None, "rate": 4000.0}
    run_bench(quick(target, "register=1", sockets=32, duration=0.6, warmup=0.1, timeout=1.0, groups=groups, members=members, seed=seed, **load))
    # A newcomer in group 3 gets the whole group back: its 10 identities.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(2)
        probe.sendto(register_request(seed, groups, 3 + members * groups), (str(target.ip), target.port))
        reply = probe.recv(65535).decode()
    listed = reply.splitlines()[1:]
    assert len(listed) == members // groups, reply


# -- the generator's own load, told honestly ----------------------------------------------


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_waiting_generator_reports_its_real_cpu_time(fake) -> None:
    """Blocked in epoll for a slow server, the generator spends little CPU: that
    waiting is neither CPU time nor "idle spin" to subtract from it (which made every
    waiting run read "generator CPU 0%")."""
    target = fake("slow")
    before = _process_cpu()
    report = run_bench(quick(target, sockets=4, window=2, duration=0.6, warmup=0.1, timeout=0.5))
    spent = _process_cpu() - before
    r, gen = report.result, report.to_json()["generator"]
    assert r.answered > 10
    assert r.idle == 0.0  # it never busy-polled: no --spin, and it always had a wait
    cpu_seconds = r.cpu_user + r.cpu_system
    assert 0.0 < cpu_seconds <= spent  # the window's CPU is part of what the whole call spent
    assert gen["cpu_per_process"] == [round(cpu_seconds / r.elapsed, 3)]
    assert gen["busy_per_process"] == gen["cpu_per_process"]


def _report(cpu: float, idle: float = 0.0, waiting: float = 0.0, spin: bool = False, rate: float | None = None) -> BenchReport:
    config = BenchConfig(target=Endpoint.from_text("127.0.0.1:9"), spin=spin, rate=rate, window=None if rate else 128)
    result = EngineResult(sent=1000, answered=1000, elapsed=1.0, cpu_user=cpu, idle=idle, runqueue_wait=waiting)
    return BenchReport(config, result, [GeneratorLoad.of(result)])


def test_the_generator_is_the_limit_only_when_its_load_says_so() -> None:
    assert _report(cpu=0.3).generator_limited is None
    assert "busy 95%" in (_report(cpu=0.95).generator_limited or "")
    # --spin polls a whole core: the polling is no work, the rest is.
    assert _report(cpu=1.0, idle=0.7, spin=True).generator_limited is None
    assert "busy 92%" in (_report(cpu=1.0, idle=0.08, spin=True).generator_limited or "")
    # Little CPU but long waits for a core: a busy machine held the generator back.
    assert "waited for a CPU core 40%" in (_report(cpu=0.2, waiting=0.4).generator_limited or "")
    # The open loop keeps its schedule or counts the sends it skipped: waits alone are no limit.
    assert _report(cpu=0.2, waiting=0.4, rate=1000.0).generator_limited is None


# -- a tracker's per-source rate limit -------------------------------------------------------


def test_high_loss_from_one_source_against_a_rate_limited_tracker_gives_the_hint(tracker) -> None:
    tp = tracker(rate_limit=None)  # the server's default per-source limit
    # One source address, as against any tracker not on IPv4 loopback.
    report = run_bench(quick(Endpoint.from_text(tp.endpoint), sockets=16, window=16, duration=0.8, warmup=0.2, timeout=0.2, spread_sources=False))
    assert report.loss_ratio > 0.3, report.to_json()
    assert report.source_addresses == 1
    hint = report.rate_limit_hint
    assert hint is not None and "from 1 source address:" in hint and "--rate-limit 0" in hint
    assert report.to_json()["hints"] == [hint]


BENCH_FEW_SOCKETS = ("--duration", "0.8", "--warmup", "0.2", "--timeout", "0.1", "--sockets", "2", "--window", "2")


def test_cli_prints_the_rate_limit_hint_against_a_limiting_tracker(tracker) -> None:
    tp = tracker(rate_limit=None)
    res = run_cli(tp.endpoint, *BENCH_FEW_SOCKETS)
    assert res.exit_code == ExitCode.OK, res.output
    hints = [line for line in res.stdout.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, res.stdout
    assert "high loss" in hints[0] and "from 2 source addresses" in hints[0] and "serve --rate-limit" in hints[0]
    assert "for a load test run it with --rate-limit 0" in hints[0]


def test_cli_gives_no_hint_against_a_tracker_without_a_rate_limit(tracker) -> None:
    # The control: the same load, the limit off, no loss to explain.
    tp = tracker(rate_limit="0")
    res = run_cli(tp.endpoint, *BENCH_FEW_SOCKETS, "--json")
    assert res.exit_code == ExitCode.OK, res.output
    doc = json.loads(res.stdout)
    assert doc["answered"] > 100 and doc["loss_ratio"] < 0.05 and doc["hints"] == []


def test_a_ramp_stopped_by_a_rate_limit_gives_the_hint(tracker) -> None:
    tp = tracker(rate_limit=None)
    res = run_cli(tp.endpoint, "--ramp", "--ramp-start", "2000", "--ramp-step", "0.5", "--ramp-budget", "3", "--warmup", "0.2", "--timeout", "0.2", "--sockets", "4")
    assert res.exit_code == ExitCode.FAILURE, res.output  # no rate held: 4 sources at 50/s each
    assert "hint: high loss" in res.stdout and "--rate-limit 0" in res.stdout, res.stdout


def test_no_hint_when_nothing_answers() -> None:
    # Total loss with no answer at all is a missing server, not a rate limit.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        target = Endpoint.from_text(f"127.0.0.1:{s.getsockname()[1]}")
        report = run_bench(quick(target, sockets=4, window=2, duration=0.3, warmup=0.0, timeout=0.1))
    assert report.loss_ratio == 1.0 and report.rate_limit_hint is None


# -- request builders agree with the protocol package ---------------------------------------


def test_stun_request_is_the_codecs_binding_request() -> None:
    txid = bytes(range(12))
    assert stun_request(txid) == stun_codec.binding_request(txid, fingerprint=False)


def test_expected_xor_mapped_address_matches_the_codec() -> None:
    txid = bytes(range(12))
    for text in ("127.0.0.1:40000", "[::1]:40000"):
        ep = Endpoint.from_text(text)
        wire = stun_codec.StunMessage(
            stun_codec.MsgClass.SUCCESS, stun_codec.Method.BINDING, txid, (stun_codec.XorMappedAddress(ep),)
        ).to_wire()
        assert xor_mapped_value(str(ep.ip), ep.port, txid) in wire


def test_register_request_is_the_seed_form() -> None:
    req = parse_request(register_request(7, 10, 1234))
    assert req.form == "seed" and req.public is None  # type: ignore[union-attr]
    assert req.lan == ("10.0.4.210",) and req.identity is not None  # type: ignore[union-attr]
    MemberList.from_wire(b"127.0.0.1:5;10.0.4.210")


def test_config_parsing() -> None:
    assert parse_mix("nat=1,register=3,trackers=0") == (("nat", 1), ("register", 3))
    with pytest.raises(UsageError):
        parse_mix("nat=0")
    with pytest.raises(UsageError):
        parse_mix("bogus=1")
    with pytest.raises(UsageError):
        parse_target("")
    with pytest.raises(UsageError):
        parse_target("example.com:43283")  # no name resolution
    assert parse_target("localhost:5").to_text() == "127.0.0.1:5"


# -- ramp ---------------------------------------------------------------------------------


def test_ramp_stops_when_loss_passes_the_threshold(fake) -> None:
    target = fake("drop10")
    strict = run_ramp(quick(target, window=None), start_rate=2000, factor=2, step_seconds=0.4, max_loss=0.05, budget_seconds=3)
    assert strict.best is None and "loss" in strict.stopped_because and len(strict.steps) == 1
    # On a busy machine the generator itself may miss its schedule (a step's sends skipped):
    # a ramp then rightly stops at its first step, which says nothing of the loss threshold,
    # so that ramp is run again (one that stops at the first loss stops so every time).
    for _ in range(3):
        lax = run_ramp(quick(target, window=None), start_rate=1000, factor=2, step_seconds=0.4, max_loss=0.2,
                       budget_seconds=3.5)
        if len(lax.steps) >= 2 or lax.steps[-1].generator_limited is None:
            break
    assert lax.best is not None and len(lax.steps) >= 2, lax.stopped_because
    rates = [s.config.rate for s in lax.steps]
    assert rates == sorted(rates)


# -- the CLI ------------------------------------------------------------------------------


def _app() -> typer.Typer:
    from nattool.cli.bench_cmd import bench

    app = typer.Typer()
    app.command()(bench)

    @app.callback()
    def _root() -> None:
        pass

    return app


def run_cli(*args: str) -> "object":
    return CliRunner().invoke(_app(), ["bench", *args])


JSON_KEYS = {
    "target", "workload", "mode", "window", "rate", "duration", "warmup", "timeout", "processes",
    "sockets", "sent", "answered", "lost", "invalid", "send_errors", "skipped", "late", "loss_ratio",
    "elapsed", "offered_rate", "achieved_rate", "latency_ms", "invalid_reasons", "by_kind", "generator",
    "spin", "hints",
}


def test_cli_json_schema_and_exit_ok(fake) -> None:
    target = fake("ok")
    res = run_cli(target.to_text(), "--duration", "0.5", "--warmup", "0.1", "--sockets", "16", "--window", "4", "--json")
    assert res.exit_code == ExitCode.OK, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == JSON_KEYS
    assert set(doc["latency_ms"]) == {"min", "p50", "p90", "p99", "p99.9", "max", "mean", "relative_error", "clock"}
    assert doc["latency_ms"]["clock"] == "user"  # closed loop: the generator's own clock
    assert set(doc["generator"]) >= {
        "cpu_user", "cpu_system", "cpu_per_process", "busy_per_process", "runqueue_wait_per_process", "limited", "limit_reason"
    }
    assert doc["answered"] == doc["sent"] > 0 and doc["mode"] == "closed"


def test_cli_human_output_without_a_terminal_has_no_live_display(fake) -> None:
    target = fake("ok")
    res = run_cli(target.to_text(), "--stun", "--duration", "0.4", "--warmup", "0", "--sockets", "8", "--window", "4")
    assert res.exit_code == ExitCode.OK, res.output
    assert "achieved rate" in res.stdout and "p99" in res.stdout
    assert "generator CPU" in res.stdout and "of one core" in res.stdout
    assert "\x1b[" not in res.stdout and "starting" not in res.stdout


def test_cli_invalid_replies_exit_1(fake) -> None:
    res = run_cli(fake("garbage").to_text(), "--duration", "0.3", "--warmup", "0", "--sockets", "4", "--window", "2", "--json")
    assert res.exit_code == ExitCode.FAILURE
    assert json.loads(res.stdout)["invalid"] > 0


def test_cli_loss_over_max_loss_exits_1(fake) -> None:
    res = run_cli(fake("drop10").to_text(), "--duration", "0.5", "--warmup", "0", "--timeout", "0.2", "--sockets", "8", "--window", "4", "--max-loss", "0.01", "--json")
    assert res.exit_code == ExitCode.FAILURE, res.output


def test_cli_no_server_exits_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound and silent: requests vanish
        res = run_cli(f"127.0.0.1:{port}", "--duration", "0.3", "--warmup", "0", "--timeout", "0.1", "--sockets", "4", "--window", "2")
    assert res.exit_code == ExitCode.TIMEOUT, res.output


@pytest.mark.parametrize(
    "args",
    [
        [],  # no target: refuse
        ["127.0.0.1:1", "--mix", "bogus=1"],
        ["127.0.0.1:1", "--window", "4", "--rate", "100"],
        ["127.0.0.1:1", "--duration", "0"],
        ["127.0.0.1:1", "--duration", "100000"],
        ["127.0.0.1:1", "--window", "100", "--sockets", "10"],
        ["not-an-endpoint"],
    ],
)
def test_cli_usage_errors_exit_2(args: list[str]) -> None:
    res = run_cli(*args)
    assert res.exit_code == ExitCode.USAGE, res.output


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "fake-server":
    fake_server(sys.argv[2])
