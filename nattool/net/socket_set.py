"""A numbered set of extra UDP sockets (birthday punching's many local ports), read by
the running event loop: plain non-blocking sockets with ``add_reader``, opened and closed
synchronously, so that a session's datagrams for a socket it just asked for can go out
in the same turn of the loop."""

from __future__ import annotations

import asyncio
import socket
from typing import Callable, Iterable, Optional

from nattool.protocol.endpoint import Endpoint

OnDatagram = Callable[[int, bytes, Endpoint], None]
READ_SIZE = 2048  # peer messages fit in 1200 bytes
READS_PER_WAKEUP = 64  # bounded, so one busy socket cannot starve the loop


class SocketSet:
    """Sockets numbered from 1, each bound to an ephemeral port of ``bind`` (or of
    every address); what arrives goes to ``on_datagram(index, data, source)``."""

    def __init__(self, on_datagram: OnDatagram, bind: Optional[str] = None) -> None:
        self.on_datagram = on_datagram
        self.bind = bind
        self.sockets: dict[int, socket.socket] = {}
        self.open_failed = 0  # sockets that could not be opened (out of file descriptors...)
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def keep_only(self, wanted: Iterable[int], ip_version: int = 4) -> None:
        """Have exactly the sockets ``wanted`` open: open the missing ones, close the rest."""
        self._loop = self._loop or asyncio.get_running_loop()
        want = set(wanted)
        for index in [i for i in self.sockets if i not in want]:
            self._close_one(index)
        family = socket.AF_INET6 if ip_version == 6 else socket.AF_INET
        for index in sorted(want - self.sockets.keys()):
            sock = self._open_one(family)
            if sock is None:
                self.open_failed += 1
                continue
            self.sockets[index] = sock
            self._loop.add_reader(sock.fileno(), self._read, index)

    def _open_one(self, family: int) -> Optional[socket.socket]:
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.bind or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        return sock

    def send(self, index: int, data: bytes, dest: Endpoint) -> bool:
        """Send from socket ``index``; False if it is not open or the send failed (a
        probe that cannot go is a probe that missed)."""
        sock = self.sockets.get(index)
        if sock is None:
            return False
        try:
            sock.sendto(data, dest.sockaddr())
        except OSError:
            return False
        return True

    def _read(self, index: int) -> None:
        sock = self.sockets.get(index)
        for _ in range(READS_PER_WAKEUP):
            if sock is None or self.sockets.get(index) is not sock:
                return  # closed by the callback
            try:
                data, addr = sock.recvfrom(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error for an earlier send: nothing to read
            try:
                src = Endpoint.from_sockaddr(addr)
            except ValueError:
                continue
            self.on_datagram(index, data, src)

    def _close_one(self, index: int) -> None:
        sock = self.sockets.pop(index)
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        for index in list(self.sockets):
            self._close_one(index)

    def __len__(self) -> int:
        return len(self.sockets)


__all__ = ["SocketSet"]
