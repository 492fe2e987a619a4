"""A small authoritative DNS server for tests, built with dnspython, on loopback only.

    with LoopbackDNS(ZONE_TEXT, origin="test.") as dns_server:
        await resolve_trackers(["a.test"], ResolveOptions(timeout=1, resolver_address=dns_server.address))

It answers from one zone over UDP (AA set): records, NODATA with the SOA, NXDOMAIN,
REFUSED outside the zone. ``rcodes`` forces an rcode for a name (SERVFAIL tests);
``drop`` swallows queries for (name, type) pairs so a single record type times out.
Every query it sees is recorded in ``queries`` so tests can prove no DNS was used.
"""

from __future__ import annotations

import socket
import threading
from typing import Optional

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.zone


class LoopbackDNS:
    def __init__(
        self,
        zone_text: str,
        *,
        origin: str = "test.",
        host: str = "127.0.0.1",
        rcodes: Optional[dict[str, int]] = None,
        drop: Optional[set[tuple[str, str]]] = None,
    ) -> None:
        if host not in ("127.0.0.1", "::1") and not host.startswith("127."):
            raise ValueError("the test DNS server listens on loopback only")
        self.origin = dns.name.from_text(origin)
        self.zone = dns.zone.from_text(zone_text, origin=self.origin, relativize=False)
        self.rcodes = {dns.name.from_text(k, self.origin): v for k, v in (rcodes or {}).items()}
        self.drop = {
            (dns.name.from_text(n, self.origin), dns.rdatatype.from_text(t)) for n, t in (drop or set())
        }
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.05)
        self.address: tuple[str, int] = (host, self.sock.getsockname()[1])
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)

    # -- lifecycle
    def start(self) -> "LoopbackDNS":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> "LoopbackDNS":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env_value(self) -> str:
        """The address as NATTOOL_DNS_SERVER writes it."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def query_count(self) -> int:
        with self._lock:
            return len(self.queries)

    # -- serving
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self._answer(wire)
            if reply is not None:
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    pass

    def _answer(self, wire: bytes) -> Optional[bytes]:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self.queries.append((qname.to_text(), dns.rdatatype.to_text(qtype)))
        if (qname, qtype) in self.drop:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if qname in self.rcodes:
            response.set_rcode(self.rcodes[qname])
            return response.to_wire()
        if not qname.is_subdomain(self.origin):
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        node = self.zone.get_node(qname)
        rdataset = node.get_rdataset(dns.rdataclass.IN, qtype) if node is not None else None
        if rdataset is not None:
            rrset = response.find_rrset(
                response.answer, qname, dns.rdataclass.IN, qtype, create=True
            )
            rrset.update(rdataset)
            return response.to_wire()
        # A name with children but no records of its own (an empty non-terminal such as
        # _udp.x.test) exists: NODATA, not NXDOMAIN.
        exists = node is not None or any(
            name != qname and name.is_subdomain(qname) for name in self.zone.nodes
        )
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        soa = self.zone.find_rdataset(self.origin, dns.rdatatype.SOA)
        rrset = response.find_rrset(
            response.authority, self.origin, dns.rdataclass.IN, dns.rdatatype.SOA, create=True
        )
        rrset.update(soa)
        return response.to_wire()


class SilentUDP:
    """A bound UDP port that never answers: a DNS server that has gone away."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address: tuple[str, int] = (host, self.sock.getsockname()[1])

    def __enter__(self) -> "SilentUDP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
