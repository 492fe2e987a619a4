"""Client transactions over UDP: one local socket per address family, several
requests in flight, retransmission with backoff, replies matched to the address the
request went to (anything else is counted in ``unexpected`` and ignored).

Shared by whoami/register/trackers and, below them, probe, connect and bench.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from nattool.errors import NattoolError, NetworkError, NoAnswer, ProtocolError, TrackerRefused
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.retransmit import backoff_schedule

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    value: T
    raw: bytes
    source: Endpoint
    rtt: float  # seconds from the latest send to the answer
    attempts: int


class UdpClient:
    """One UDP socket. Requests to the same destination are serialised, so that a
    reply is never attributed to the wrong request."""

    def __init__(self, transport: asyncio.DatagramTransport, family: int) -> None:
        self.transport = transport
        self.family = family
        self._waiters: dict[tuple[str, int], asyncio.Queue[bytes]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.unexpected = 0
        self.listener: Callable[[bytes, Endpoint], None] | None = None
        self._last_error: Exception | None = None

    @classmethod
    async def open(cls, family: int = socket.AF_INET, local_host: str | None = None, local_port: int = 0) -> "UdpClient":
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            host = local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            sock.bind((host, local_port))
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot open a UDP socket on port {local_port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        holder: dict[str, UdpClient] = {}
        transport, _ = await loop.create_datagram_endpoint(lambda: _Late(holder), sock=sock)
        client = cls(transport, family)  # type: ignore[arg-type]
        holder["c"] = client
        return client

    @property
    def local(self) -> Endpoint:
        return Endpoint.from_sockaddr(self.transport.get_extra_info("sockname")[:2])

    def close(self) -> None:
        self.transport.close()

    def _deliver(self, data: bytes, addr: Any) -> None:
        key = (_norm_host(addr[0]), int(addr[1]))
        queue = self._waiters.get(key)
        if queue is not None:
            queue.put_nowait(data)
            return
        if self.listener is not None:
            try:
                src = Endpoint.from_sockaddr(addr)
            except ValueError:
                return
            self.listener(data, src)
            return
        self.unexpected += 1

    def _error(self, exc: Exception) -> None:
        self._last_error = exc

    def send(self, dest: Endpoint, payload: bytes) -> None:
        self._last_error = None
        try:
            self.transport.sendto(payload, dest.sockaddr())
        except OSError as exc:
            raise NetworkError(f"cannot send to {dest}: {exc.strerror or exc}") from None
        # asyncio hands a failed sendto (no route, ...) to error_received, not to us.
        failed, self._last_error = self._last_error, None
        if isinstance(failed, OSError):
            raise NetworkError(f"cannot send to {dest}: {failed.strerror or failed}")

    async def request(
        self,
        dest: Endpoint,
        payload: bytes,
        parse: Callable[[bytes], T],
        *,
        timeout: float = 2.0,
        retries: int = 3,
    ) -> Answer[T]:
        """Send ``payload`` until ``parse`` accepts an answer from ``dest``.

        ``parse`` raising TrackerRefused ends the transaction at once (the tracker
        said no); any other error of ours marks garbage, ignored while the wait goes on.
        A send that fails raises NetworkError at once.
        """
        key = (str(dest.ip), dest.port)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            self._waiters[key] = queue
            try:
                return await self._exchange(dest, payload, parse, queue, timeout, retries)
            finally:
                del self._waiters[key]

    async def _exchange(
        self,
        dest: Endpoint,
        payload: bytes,
        parse: Callable[[bytes], T],
        queue: "asyncio.Queue[bytes]",
        timeout: float,
        retries: int,
    ) -> Answer[T]:
        last_problem: NattoolError | None = None
        for attempt, wait in enumerate(backoff_schedule(timeout, retries), start=1):
            sent = time.perf_counter()
            self.send(dest, payload)
            deadline = sent + wait
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    # Not asyncio.wait_for: on Python 3.11 it can swallow a
                    # cancellation (Ctrl-C) that lands as the reply arrives, and the
                    # command then runs on (CPython gh-86296).
                    async with asyncio.timeout(left):
                        data = await queue.get()
                except TimeoutError:
                    break
                try:
                    value = parse(data)
                except TrackerRefused:
                    raise
                except NattoolError as exc:
                    last_problem = exc
                    continue
                return Answer(value, data, dest, time.perf_counter() - sent, attempt)
        if last_problem is not None:
            raise ProtocolError(f"{dest} answered, but not validly: {last_problem}")
        raise NoAnswer(f"no answer from {dest} after {retries + 1} tries in {timeout:g}s")


class _Late(asyncio.DatagramProtocol):
    """Placeholder until the client object exists (create_datagram_endpoint needs a
    factory before we have the transport)."""

    def __init__(self, holder: dict[str, UdpClient]) -> None:
        self.holder = holder

    def datagram_received(self, data: bytes, addr: Any) -> None:
        client = self.holder.get("c")
        if client is not None:
            client._deliver(data, addr)

    def error_received(self, exc: Exception) -> None:
        client = self.holder.get("c")
        if client is not None:
            client._error(exc)


def _norm_host(host: str) -> str:
    host = host.split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class ClientPool:
    """Lazily opened sockets, one per address family, shared by a command's requests
    so that every tracker sees the same local port (the same NAT mapping).

    ``local_host`` binds the socket of its own family to that address (`connect
    --bind`; loopback tests stand in for hosts with different public IPs by binding
    127.0.0.2, 127.0.0.3, ...); the other family binds the wildcard.
    """

    def __init__(self, local_port: int = 0, local_host: str | None = None) -> None:
        self.local_port = local_port
        self.local_host = local_host
        self._clients: dict[int, UdpClient] = {}
        # Requests to several trackers start together: the first opens the socket, the
        # others wait for it (two sockets would be two NAT mappings).
        self._opening = asyncio.Lock()

    async def for_endpoint(self, dest: Endpoint) -> UdpClient:
        family = socket.AF_INET6 if dest.ip.version == 6 else socket.AF_INET
        async with self._opening:
            client = self._clients.get(family)
            if client is None:
                host = self.local_host if self.local_host and _family_of(self.local_host) == family else None
                client = self._clients[family] = await UdpClient.open(family, host, self.local_port)
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    async def __aenter__(self) -> "ClientPool":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _family_of(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET
