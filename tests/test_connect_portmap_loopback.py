"""`nattool connect` on loopback, for what the port mapping changed around it: trackers
on loopback are reached without asking any gateway (no wait, no event), and SIGTERM ends
a run as Ctrl-C does (the peer hears the goodbye at once), but with exit status 0."""

from __future__ import annotations

import signal

from tests.conftest import free_udp_port
from tests.test_connect_loopback import A_IP, B_IP, finish, json_events, pair  # noqa: F401 - fixture


def test_sigterm_leaves_like_ctrl_c_and_exits_0(pair) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    tp, start = pair
    a = start(A_IP, free_udp_port(A_IP), "--json")
    b = start(B_IP, free_udp_port(B_IP), "--json")
    a.expect('"event":"path_up"')
    b.expect('"event":"path_up"')
    a.kill(signal.SIGTERM)
    assert finish(a) == 0
    b.expect(r'"event":"path_down"[^\n]*"reason":"the peer left"', timeout=3)
    b.kill(signal.SIGINT)
    assert finish(b) == 130


def test_trackers_on_loopback_are_registered_at_without_asking_a_gateway(pair) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    tp, start = pair
    a = start(A_IP, free_udp_port(A_IP), "--json", "--timeout", "1")
    assert finish(a) == 3  # alone in the group
    evs = json_events(a)
    assert [e for e in evs if e["event"] == "registered"], evs
    # Asking would have said something: "granted", or "none" (registering held back meanwhile).
    assert not [e for e in evs if e["event"] == "portmap"], evs
