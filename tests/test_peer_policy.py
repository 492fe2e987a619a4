"""Which peers a relay may reach: the default-deny list, --allow-peer, --deny-peer and
the server's own service endpoints."""

from __future__ import annotations

import ipaddress

import pytest

from nattool.errors import UsageError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.peer_policy import PeerPolicy, parse_cidr

DENIED = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.1.1",
    "224.0.0.1",
    "239.255.255.250",
    "0.0.0.0",
    "0.1.2.3",
    "255.255.255.255",
    "::",
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:192.168.0.1",
]
ALLOWED = [
    "192.0.2.1",  # documentation ranges: the lab uses them
    "198.51.100.7",
    "203.0.113.9",
    "2001:db8::1",
    "100.64.0.1",  # carrier-grade NAT space: not in the list
    "8.8.8.8",
    "172.32.0.1",
    "2a00:1450::1",
]


@pytest.mark.parametrize("text", DENIED)
def test_denied_by_default(text: str) -> None:
    assert PeerPolicy().ip_denied(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", ALLOWED)
def test_allowed_by_default(text: str) -> None:
    assert not PeerPolicy().ip_denied(ipaddress.ip_address(text))


def test_allow_overrides_and_deny_adds() -> None:
    policy = PeerPolicy.from_text(allow=["127.0.0.1", "10.1.0.0/16"], deny=["192.0.2.0/24", "2001:db8::/32"])
    assert not policy.ip_denied(ipaddress.ip_address("127.0.0.1"))
    assert not policy.ip_denied(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert policy.ip_denied(ipaddress.ip_address("127.0.0.2"))
    assert not policy.ip_denied(ipaddress.ip_address("10.1.2.3"))
    assert policy.ip_denied(ipaddress.ip_address("10.2.0.1"))
    assert policy.ip_denied(ipaddress.ip_address("192.0.2.1"))
    assert policy.ip_denied(ipaddress.ip_address("2001:db8::5"))
    assert policy.explicitly_allowed(ipaddress.ip_address("10.1.2.3"))
    assert not policy.explicitly_allowed(ipaddress.ip_address("8.8.8.8"))


def test_service_endpoints() -> None:
    policy = PeerPolicy.from_text(
        service_endpoints=[Endpoint.from_text("203.0.113.1:43283"), Endpoint.from_text("0.0.0.0:3478")],
        server_ips=[ipaddress.ip_address("203.0.113.1")],
    )
    assert policy.is_service(Endpoint.from_text("203.0.113.1:43283"))
    assert not policy.is_service(Endpoint.from_text("203.0.113.1:43284"))
    assert policy.is_service(Endpoint.from_text("203.0.113.1:3478"))  # wildcard bind
    assert policy.is_service(Endpoint.from_text("127.0.0.1:3478"))
    assert not policy.is_service(Endpoint.from_text("198.51.100.1:3478"))
    relay_ip = ipaddress.ip_address("198.51.100.1")
    assert policy.is_service(Endpoint.from_text("198.51.100.1:3478"), frozenset({relay_ip}))


def test_bad_cidr_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_cidr("10.0.0.0/33")
    with pytest.raises(UsageError):
        parse_cidr("example.com")
    assert parse_cidr("10.0.0.1/8") == ipaddress.ip_network("10.0.0.0/8")
