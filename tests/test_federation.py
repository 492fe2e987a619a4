"""Federation decisions, pure: verification, the sender-IP rule, rate limits, expiry."""

from __future__ import annotations

from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import AnnounceRequest
from nattool.tracker.federation import NAT_PROBE, PULL, Federation, FederationConfig


def ep(text: str) -> Endpoint:
    return Endpoint.from_text(text)


def test_announced_tracker_is_listed_only_after_it_answers_nat() -> None:
    fed = Federation(FederationConfig(tracker_ttl=100))
    fed.on_announce(AnnounceRequest((ep("203.0.113.5:43283"),)), ep("203.0.113.5:40000"), now=0.0)
    assert fed.tracker_list(0.0).trackers == ()
    out = fed.outgoing(0.0, 0.0)
    assert out == [(ep("203.0.113.5:43283"), NAT_PROBE)]
    assert fed.is_expected(ep("203.0.113.5:43283"))
    fed.on_reply(ep("203.0.113.5:43283"), b"198.51.100.1:43283", 0.1, 0.1)
    assert fed.tracker_list(0.2).trackers == ("203.0.113.5:43283",)
    assert fed.public is None  # a stranger's answer never sets our own endpoint
    events = fed.take_events()
    assert [r.endpoint for r in events.saved] == [ep("203.0.113.5:43283")]


def test_announcement_for_another_ip_is_ignored() -> None:
    fed = Federation(FederationConfig())
    fed.on_announce(AnnounceRequest((ep("203.0.113.9:43283"),)), ep("203.0.113.5:40000"), now=0.0)
    assert fed.outgoing(0.0, 0.0) == []
    assert fed.dropped_announcements == 1


def test_silent_endpoint_is_never_listed() -> None:
    fed = Federation(FederationConfig(retry_interval=1.0, max_attempts=3))
    fed.on_announce(AnnounceRequest((ep("203.0.113.5:1"),)), ep("203.0.113.5:40000"), now=0.0)
    sent = 0
    for t in range(10):
        sent += len(fed.outgoing(float(t), float(t)))
    assert sent == 3
    assert not fed.is_expected(ep("203.0.113.5:1"))
    assert fed.tracker_list(10.0).trackers == ()
    assert fed.failed_verifications == 1


def test_wrong_answer_does_not_verify() -> None:
    fed = Federation(FederationConfig())
    fed.on_announce(AnnounceRequest((ep("203.0.113.5:43283"),)), ep("203.0.113.5:40000"), now=0.0)
    fed.outgoing(0.0, 0.0)
    fed.on_reply(ep("203.0.113.5:43283"), b"\x00garbage", 0.1, 0.1)
    assert fed.tracker_list(1.0).trackers == ()


def test_announcements_are_rate_limited_per_source() -> None:
    fed = Federation(FederationConfig(announce_rate_per_min=10))
    for i in range(30):
        fed.on_announce(AnnounceRequest((ep(f"203.0.113.5:{1000 + i}"),)), ep("203.0.113.5:40000"), now=0.0)
    assert fed.dropped_announcements == 20


def test_listed_trackers_expire() -> None:
    fed = Federation(FederationConfig(tracker_ttl=10))
    fed.on_announce(AnnounceRequest((ep("203.0.113.5:43283"),)), ep("203.0.113.5:1"), now=0.0)
    fed.outgoing(0.0, 0.0)
    fed.on_reply(ep("203.0.113.5:43283"), b"198.51.100.1:43283", 0.0, 0.0)
    fed.take_events()
    assert "203.0.113.5:43283" in fed.tracker_list(5.0).trackers
    fed.outgoing(11.0, 11.0)
    assert "203.0.113.5:43283" not in fed.tracker_list(11.0).trackers
    assert fed.take_events().dropped == [ep("203.0.113.5:43283")]


def test_public_endpoint_is_learned_from_a_joined_tracker_only() -> None:
    join = ep("203.0.113.7:43283")
    fed = Federation(FederationConfig(), joins=(join,))
    assert fed.outgoing(0.0, 0.0) == [(join, NAT_PROBE)]
    fed.on_reply(join, b"198.51.100.1:43283", 0.0, 0.0)
    assert fed.public == ep("198.51.100.1:43283")
    assert fed.take_events().learned_public == ep("198.51.100.1:43283")
    assert fed.tracker_list(1.0).trackers == ("198.51.100.1:43283", "203.0.113.7:43283")


def test_join_round_verifies_announces_and_pulls_one_at_a_time() -> None:
    join = ep("203.0.113.7:43283")
    fed = Federation(FederationConfig(announce_interval=60), public=ep("198.51.100.1:43283"), joins=(join,))
    assert fed.outgoing(0.0, 0.0) == [(join, NAT_PROBE)]
    fed.on_reply(join, b"198.51.100.1:43283", 0.0, 0.0)
    assert fed.outgoing(0.1, 0.1) == [(join, b"//tcksvr/198.51.100.1:43283")]
    fed.on_reply(join, b"203.0.113.7:43283\n203.0.113.8:43283", 0.2, 0.2)
    out = fed.outgoing(0.3, 0.3)
    assert (join, PULL) in out and (ep("203.0.113.8:43283"), NAT_PROBE) in out
