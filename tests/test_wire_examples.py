"""Every example of PROTOCOL.md, byte for byte, on real UDP against `nattool serve`.

Loopback addresses stand for public IPs: 127.0.0.2 for 122.44.78.33 and 127.0.0.3
for 22.144.178.133 (the seed's example).
"""

from __future__ import annotations

import re
import time
import uuid

from conftest import TrackerProcess, ask_on, lines, recv_from, udp_ask, udp_socket

REG = "//51pwn/P2P&E2E/"
SEED_GROUP = "46D0F69E-E347-47A7-8E95-43E5BAA95348"
MAC_RE = re.compile(rb"[0-9a-fA-F]{2}([:-]?)[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}")


def bound(request: bytes) -> int:
    return min(max(3 * len(request), 128), 1200)


def ask(tp: TrackerProcess, payload: bytes, src_ip: str = "127.0.0.2", src_port: int = 0) -> bytes | None:
    reply = tp.ask(payload, src_ip=src_ip, src_port=src_port)
    if reply is not None:
        assert len(reply) <= bound(payload), (payload, reply)
    return reply


def new_group() -> str:
    return str(uuid.uuid4())


# -- 1. //nat ----------------------------------------------------------------------------


def test_nat_answers_the_observed_source_endpoint(shared_tracker: TrackerProcess) -> None:
    for src_ip in ("127.0.0.2", "127.0.0.3"):
        with udp_socket(src_ip) as sock:
            port = sock.getsockname()[1]
            assert ask_on(sock, b"//nat", shared_tracker) == f"{src_ip}:{port}".encode()
            # The same through the general path: an extension line and padding are ignored.
            assert ask_on(sock, b"//nat\nfoo=bar\n" + b" " * 30, shared_tracker) == f"{src_ip}:{port}".encode()


# -- 2. registration -----------------------------------------------------------------------


def test_seed_registration_example_byte_for_byte(shared_tracker: TrackerProcess) -> None:
    """The seed's three-member reply: own line with its LAN list first, then newest
    first: the other-IP member without LAN, the same-IP member with its LAN."""
    g = SEED_GROUP
    # 122.44.78.33:1998, publishing one LAN address, registers first.
    r1 = ask(shared_tracker, f"{REG}{g}/0/192.168.0.57/11:22:33:44:55:01".encode(), "127.0.0.2", 41998)
    assert r1 == b"127.0.0.2:41998;192.168.0.57"
    # 22.144.178.133:1998 next; its LAN list is for its own public IP only.
    r2 = ask(shared_tracker, f"{REG}{g}/0/10.1.1.1/11:22:33:44:55:02".encode(), "127.0.0.3", 41998)
    assert r2 == b"127.0.0.3:41998;10.1.1.1\n127.0.0.2:41998"
    # The seed's own request, verbatim, from 122.44.78.33:998.
    seed_request = b"//51pwn/P2P&E2E/46D0F69E-E347-47A7-8E95-43E5BAA95348/0/192.168.0.56,172.66.0.10/77:5b:67:a5:87:66"
    r3 = ask(shared_tracker, seed_request, "127.0.0.2", 40998)
    assert r3 == b"127.0.0.2:40998;192.168.0.56,172.66.0.10\n127.0.0.3:41998\n127.0.0.2:41998;192.168.0.57"


def test_seed_explicit_public_example(shared_tracker: TrackerProcess) -> None:
    """Seed section 3: an explicit public endpoint and lan 0: one bare line."""
    g = new_group()
    with udp_socket("127.0.0.2") as sock:
        reply = ask_on(sock, f"{REG}{g}/127.0.0.2:998/0/77:5b:67:a5:87:66".encode(), shared_tracker)
    assert reply == b"127.0.0.2:998"
    other = ask(shared_tracker, f"{REG}{g}/0/0/0".encode(), "127.0.0.3", 0)
    assert other is not None and lines(other)[1:] == ["127.0.0.2:998"]


def test_original_client_three_field_form(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    with udp_socket("127.0.0.2") as a, udp_socket("127.0.0.2") as b, udp_socket("127.0.0.3") as c:
        pa, pb, pc = (s.getsockname()[1] for s in (a, b, c))
        ra = ask_on(a, f"{REG}{g}/0/02:42:ac:11:00:03-192.168.1.11".encode(), shared_tracker)
        assert ra == f"127.0.0.2:{pa};192.168.1.11".encode()
        rb = ask_on(b, f"{REG}{g}/0/02:42:ac:11:00:02-192.168.1.10,10.0.0.5".encode(), shared_tracker)
        assert rb == f"127.0.0.2:{pb};192.168.1.10,10.0.0.5\n127.0.0.2:{pa};192.168.1.11".encode()
        # Several interfaces: "<mac>-<ip>,<ip>;<mac>-<ip>": the first MAC is the identity,
        # every IP is a LAN address.
        rc = ask_on(c, f"{REG}{g}/0/02:42:ac:11:00:04-10.9.0.1;02:42:ac:11:00:05-10.9.1.1,10.9.1.2".encode(), shared_tracker)
        assert rc == f"127.0.0.3:{pc};10.9.0.1,10.9.1.1,10.9.1.2\n127.0.0.2:{pb}\n127.0.0.2:{pa}".encode()
        # Re-registering with the same first MAC from another port replaces the entry.
        with udp_socket("127.0.0.3") as c2:
            pc2 = c2.getsockname()[1]
            rc2 = ask_on(c2, f"{REG}{g}/0/02:42:ac:11:00:04-10.9.0.1".encode(), shared_tracker)
            assert rc2 == f"127.0.0.3:{pc2};10.9.0.1\n127.0.0.2:{pb}\n127.0.0.2:{pa}".encode()


def test_uuid_group_is_case_insensitive(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    upper = ask(shared_tracker, f"{REG}{g.upper()}/0/0/aa:00:00:00:00:01".encode(), "127.0.0.2", 0)
    assert upper is not None and len(lines(upper)) == 1
    with udp_socket("127.0.0.3") as sock:
        lower = ask_on(sock, f"{REG}{g.lower()}/0/0/aa:00:00:00:00:02".encode(), shared_tracker)
    assert lower is not None
    assert lines(lower)[1:] == [lines(upper)[0]]


def test_non_uuid_group_is_case_sensitive(shared_tracker: TrackerProcess) -> None:
    name = "Room-" + uuid.uuid4().hex[:8]
    first = ask(shared_tracker, f"{REG}{name}/0/0/aa:00:00:00:01:01".encode(), "127.0.0.2", 0)
    assert first is not None
    other = ask(shared_tracker, f"{REG}{name.lower()}/0/0/aa:00:00:00:01:02".encode(), "127.0.0.3", 0)
    assert other is not None and len(lines(other)) == 1
    same = ask(shared_tracker, f"{REG}{name}/0/0/aa:00:00:00:01:03".encode(), "127.0.0.3", 0)
    assert same is not None and lines(same)[1:] == lines(first)


def test_reregistration_with_same_mac_replaces_the_entry(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    with udp_socket("127.0.0.2") as old, udp_socket("127.0.0.2") as new, udp_socket("127.0.0.3") as watcher:
        p_old, p_new = old.getsockname()[1], new.getsockname()[1]
        assert ask_on(old, f"{REG}{g}/0/0/AA-BB-CC-00-00-01".encode(), shared_tracker) == f"127.0.0.2:{p_old}".encode()
        # The same identity written another way (any case, any separator) is the same node.
        assert ask_on(new, f"{REG}{g}/0/0/aabbcc000001".encode(), shared_tracker) == f"127.0.0.2:{p_new}".encode()
        seen = ask_on(watcher, f"{REG}{g}/0/0/0".encode(), shared_tracker)
        assert seen is not None and lines(seen)[1:] == [f"127.0.0.2:{p_new}"]


def test_without_identity_the_endpoint_is_the_identity(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    with udp_socket("127.0.0.2") as a:
        pa = a.getsockname()[1]
        assert ask_on(a, f"{REG}{g}/0/0/0".encode(), shared_tracker) == f"127.0.0.2:{pa}".encode()
        # Again from the same endpoint: still one member, not two.
        assert ask_on(a, f"{REG}{g}/0/0/0".encode(), shared_tracker) == f"127.0.0.2:{pa}".encode()


def test_explicit_public_endpoint_with_another_ip_is_refused(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    payload = f"{REG}{g}/127.0.0.9:5000/0/0".encode()
    reply = ask(shared_tracker, payload, "127.0.0.2", 0)
    assert reply is not None and reply.startswith(b"ERR "), reply
    # Nothing was registered: a later member sees no 127.0.0.9 entry.
    later = ask(shared_tracker, f"{REG}{g}/0/0/0".encode(), "127.0.0.3", 0)
    assert later is not None and len(lines(later)) == 1
    # Same IP, another port: accepted as given.
    ok = ask(shared_tracker, f"{REG}{g}/127.0.0.2:5000/0/0".encode(), "127.0.0.2", 0)
    assert ok == b"127.0.0.2:5000\n" + lines(later)[0].encode()


def test_macs_never_appear_in_any_reply(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    requests = [
        ("127.0.0.2", f"{REG}{g}/0/192.168.7.1/de:ad:be:ef:00:01"),
        ("127.0.0.2", f"{REG}{g}/0/192.168.7.2/DE-AD-BE-EF-00-02"),
        ("127.0.0.3", f"{REG}{g}/0/0/deadbeef0003"),
        ("127.0.0.2", f"{REG}{g}/0/de:ad:be:ef:00:04-192.168.7.4,10.0.0.4"),
        ("127.0.0.3", f"{REG}{g}/0/de:ad:be:ef:00:05-192.168.7.5;de:ad:be:ef:00:06-10.0.0.6"),
    ]
    replies = []
    for src, text in requests:
        reply = ask(shared_tracker, text.encode(), src, 0)
        assert reply is not None and not reply.startswith(b"ERR"), (text, reply)
        replies.append(reply)
    assert len(lines(replies[-1])) == 5
    for reply in replies:
        assert b"dead" not in reply.lower() and b"be:ef" not in reply.lower(), reply
        assert MAC_RE.search(reply) is None, reply


# -- 3. trackers ----------------------------------------------------------------------------


def test_tracker_list_with_no_trackers_is_an_empty_datagram(shared_tracker: TrackerProcess) -> None:
    assert ask(shared_tracker, b"//tcksvr") == b""


# -- 5. safety: ERR and silence ----------------------------------------------------------------

MALFORMED = [
    b"//",
    b"//nat/x",
    b"//nothing",
    b"//51pwn/P2P&E2E/",
    b"//51pwn/P2P&E2E/g/0",
    b"//51pwn/P2P&E2E/g/0/0/0/0",
    b"//51pwn/P2P&E2E/bad group!/0/0/0",
    b"//51pwn/P2P&E2E/" + b"g" * 65 + b"/0/0/0",
    b"//51pwn/P2P&E2E/g/1.2.3:4/0/0",
    b"//51pwn/P2P&E2E/g/0/999.1.1.1/0",
    b"//51pwn/P2P&E2E/g/0/" + b",".join(b"10.0.0.%d" % i for i in range(17)) + b"/0",
    b"//51pwn/P2P&E2E/g/0/0/zz:zz:zz:zz:zz:zz",
    b"//51pwn/P2P&E2E/g/0/not-a-macip",
    b"//tcksvr/",
    b"//tcksvr/not-an-endpoint",
    b"//\xff\xfe",
    b"//nat\xff",
    b"//51pwn/P2P&E2E/g/0/0/0\noffset=abc",
]


def test_malformed_requests_get_a_short_err(shared_tracker: TrackerProcess) -> None:
    with udp_socket("127.0.0.4") as sock:
        for payload in MALFORMED:
            reply = ask_on(sock, payload, shared_tracker)
            assert reply is not None, f"no ERR for {payload!r}"
            assert reply.startswith(b"ERR "), (payload, reply)
            assert b"\n" not in reply and len(reply) <= 64, (payload, reply)
            assert len(reply) <= bound(payload)
            reply.decode("ascii")


JUNK = [
    b"hello",
    b"/nat",
    b" //nat",
    b"\\\\nat",
    b"NAT",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00",
    b"\x00\x01\x02\x03",
    bytes(range(256)),
    b"\xff" * 40,
]


def test_non_slash_slash_junk_gets_no_reply(shared_tracker: TrackerProcess) -> None:
    with udp_socket("127.0.0.4") as sock:
        for payload in JUNK:
            sock.sendto(payload, shared_tracker.addr)
        # Datagrams from one socket are handled in order: the first thing back must be
        # the answer to this //nat, sent after all the junk.
        sock.sendto(b"//nat", shared_tracker.addr)
        first = recv_from(sock, shared_tracker, 2.0)
        assert first == f"127.0.0.4:{sock.getsockname()[1]}".encode()
        assert recv_from(sock, shared_tracker, 0.3) is None


# -- soft state ------------------------------------------------------------------------------


def test_members_expire_after_the_ttl(tracker) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--ttl", "1")
    g = new_group()
    with udp_socket("127.0.0.2") as a, udp_socket("127.0.0.3") as b:
        pa, pb = a.getsockname()[1], b.getsockname()[1]
        assert ask_on(a, f"{REG}{g}/0/0/0".encode(), tp) == f"127.0.0.2:{pa}".encode()
        assert ask_on(b, f"{REG}{g}/0/0/0".encode(), tp) == f"127.0.0.3:{pb}\n127.0.0.2:{pa}".encode()
        time.sleep(1.6)
        assert ask_on(b, f"{REG}{g}/0/0/0".encode(), tp) == f"127.0.0.3:{pb}".encode()


# -- paging extension ----------------------------------------------------------------------------


def test_paging_extension_walks_the_whole_list(shared_tracker: TrackerProcess) -> None:
    g = new_group()
    members: list[str] = []
    socks = [udp_socket("127.0.0.3") for _ in range(30)]
    try:
        for sock in socks:
            reply = ask_on(sock, f"{REG}{g}/0/0/0".encode(), shared_tracker)
            assert reply is not None and not reply.startswith(b"ERR")
            members.append(f"127.0.0.3:{sock.getsockname()[1]}")
    finally:
        for sock in socks:
            sock.close()
    newest_first = members[::-1]

    with udp_socket("127.0.0.2") as me:
        own = f"127.0.0.2:{me.getsockname()[1]}"
        # An old client (no extension) gets a list cut to the bound, newest kept, and
        # never a "next=" line it would not understand.
        plain = f"{REG}{g}/0/0/0".encode()
        reply = ask_on(me, plain, shared_tracker)
        assert reply is not None and len(reply) <= bound(plain)
        got = lines(reply)
        assert got[0] == own
        assert 1 <= len(got) - 1 < 30
        assert got[1:] == newest_first[: len(got) - 1]
        assert not any(line.startswith("next=") for line in got)

        seen: list[str] = []
        offset = 0
        for _ in range(30):
            request = f"{REG}{g}/0/0/0\noffset={offset}".encode()
            reply = ask_on(me, request, shared_tracker)
            assert reply is not None and len(reply) <= bound(request), reply
            page = lines(reply)
            assert page[0] == own
            nxt = [line for line in page if line.startswith("next=")]
            entries = [line for line in page[1:] if not line.startswith("next=")]
            assert entries, page
            seen += entries
            if not nxt:
                break
            assert page[-1] == nxt[0] and len(nxt) == 1
            assert int(nxt[0][5:]) == offset + len(entries)
            offset = int(nxt[0][5:])
        else:
            raise AssertionError("paging never ended")
        assert offset > 0, "the first page was not cut: the test proves nothing"
        assert seen == newest_first
