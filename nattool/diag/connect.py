"""`connect`'s I/O: sockets, timers and stdin around the pure session
(:mod:`nattool.protocol.connect_session`), and the library API built on them.

The decisions (registration, candidates, probing, paths, give-up, verdicts) are all in
the session; this module only moves its datagrams, arms its timer and hands its events
on: to the CLI's renderer (:func:`connect_session`) or to a :class:`PeerConnection`
(:func:`connect`, what ``import nattool`` offers)::

    async with await nattool.connect("my-group", ["tracker.example.org"]) as conn:
        peer = await conn.wait_for_peer()
        await conn.send(b"hello", to=peer)
        sender, data = await conn.recv()
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import stat
import sys
from collections import deque
from typing import Awaitable, Callable, Optional, Sequence

from nattool.diag.connect_portmap import SocketMapping, worth_mapping
from nattool.errors import NattoolError, NetworkError, NoAnswer, ProtocolError, UsageError
from nattool.exit_codes import ExitCode
from nattool.net.client import ClientPool, UdpClient
from nattool.net.localinfo import lan_addresses
from nattool.net.socket_set import SocketSet
from nattool.protocol.birthday import DEFAULT_BUDGET, DEFAULT_RATE
from nattool.protocol.birthday import check_limits as check_birthday_limits
from nattool.protocol.connect_events import ConnectEvent, KeepaliveSet, MessageReceived, PathUp, SessionEnded, StreamWanted
from nattool.protocol.connect_events import ExtraSockets
from nattool.protocol.connect_events import PortMapped
from nattool.protocol.connect_options import DEFAULT_CONNECT_PORT, RelayMode
from nattool.protocol.connect_session import ConnectSession, SessionConfig
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import KeepalivePlan
from nattool.protocol.punch import MAX_BODY
from nattool.protocol.stream_frames import StreamDeframer, TextFrame, text_frame
from nattool.protocol.text import canonical_group, canonical_mac, parse_lan_list
from nattool.protocol.tracker_spec import TrackerLike, as_tracker_specs

OnEvent = Callable[[ConnectEvent], None]
Retune = Callable[[Callable[[KeepalivePlan], None]], Awaitable[None]]


class NoPath(NattoolError):
    """No path is up to the peer(s) a datagram is for, or none could be opened."""


class ConnectionClosed(NattoolError):
    """The connection was closed (by its owner, or because its session ended)."""


# --------------------------------------------------------------------------- the shell


STREAM_CONNECT_TIMEOUT = 5.0  # s for a TCP connection to a tracker to open
STREAM_READ = 65536


class TrackerStream:
    """A TCP connection to a tracker's port carrying what would be datagrams to it:
    text in text frames, STUN/TURN as they are (self-delimiting), framed as
    :mod:`nattool.protocol.stream_frames` says; frames in are handed on as datagrams."""

    def __init__(self, tracker: Endpoint, on_frame: Callable[[bytes], None], on_gone: Callable[[str], None]) -> None:
        self.tracker = tracker
        self.on_frame = on_frame
        self.on_gone = on_gone
        self.writer: Optional[asyncio.StreamWriter] = None
        self.task: Optional[asyncio.Task[None]] = None

    async def open(self, bind: Optional[str]) -> None:
        local = (bind, 0) if bind is not None else None
        reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(str(self.tracker.ip), self.tracker.port, local_addr=local),
            STREAM_CONNECT_TIMEOUT)
        self.task = asyncio.create_task(self._read(reader))

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        # Text starts with "//", which the framing would take for STUN: it gets a header.
        self.writer.write(text_frame(data) if data.startswith(b"//") else data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        deframer = StreamDeframer()
        try:
            while chunk := await reader.read(STREAM_READ):
                for frame in deframer.feed(chunk):
                    self.on_frame(frame.payload if isinstance(frame, TextFrame) else frame.data)
            why = "closed by the tracker"
        except (OSError, ProtocolError) as exc:
            why = str(exc) or type(exc).__name__
        self.on_gone(why)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


class SessionShell:
    """Runs a :class:`ConnectSession` on real sockets: one per address family of the
    trackers, bound to ``port`` (and ``bind``), shared by registrations and peers; and
    a TCP connection to each tracker when the session asks for one (StreamWanted)."""

    def __init__(self, config: SessionConfig, on_event: OnEvent, *, port: int = DEFAULT_CONNECT_PORT,
                 bind: Optional[str] = None) -> None:
        self.config = config
        self.on_event = on_event
        self.bind = bind
        self.pool = ClientPool(port, bind)
        self.clients: dict[int, UdpClient] = {}
        self.streams: dict[Endpoint, TrackerStream] = {}
        self.extra = SocketSet(self._on_extra_datagram, bind)  # birthday punching's sockets
        self._tasks: set[asyncio.Task[None]] = set()
        self.session: Optional[ConnectSession] = None
        self.ended: Optional[SessionEnded] = None
        self.closed = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.mapping = SocketMapping(self._report_mapping, on_event)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        local: Optional[Endpoint] = None
        try:
            for tracker in self.config.trackers:
                family = _family(tracker)
                if family not in self.clients:
                    client = await self.pool.for_endpoint(tracker)
                    client.listener = self._on_datagram
                    self.clients[family] = client
                    local = local or client.local
        except BaseException:
            self.pool.close()
            raise
        v4 = self.clients.get(socket.AF_INET)
        if self.config.portmap and (v4 is None or not worth_mapping(self.config.trackers, self.bind)):
            self.config = dataclasses.replace(self.config, portmap=False)  # nothing to map: do not wait
        self.session = ConnectSession(self.config, os.urandom(8), self._loop.time(), local, seed=os.urandom(16))
        if self.config.portmap and v4 is not None:
            self.mapping.start(v4.local.port, self.bind)
        self._pump()

    @property
    def live(self) -> ConnectSession:
        assert self.session is not None, "open() first"
        return self.session

    def send(self, data: bytes, to: Optional[str] = None) -> int:
        count = self.live.send(data, self._now(), to)
        self._pump()
        return count

    def close_when_delivered(self) -> None:
        self.live.close_when_delivered(self._now())
        self._pump()

    def set_keepalive(self, plan: KeepalivePlan) -> None:
        """New keepalive intervals (`--keepalive auto` measured the mapping lifetime)."""
        if self.session is not None and not self.closed:
            self.session.set_keepalive(plan, self._now())
            self._pump()

    def leave(self) -> None:
        if self.session is not None and not self.closed:
            self.session.leave(self._now())
            self._pump()

    async def linger(self) -> None:
        """After leave(): the moment the goodbyes through a relay need before the
        allocation goes back (see ConnectSession.leave)."""
        until = self.session.linger_until if self.session is not None and not self.closed else None
        if until is not None:
            await asyncio.sleep(max(0.0, until - self._now()))

    def close(self) -> None:
        if self.session is not None and not self.closed:
            self.session.release_relay(self._now())  # if leave() left it lingering
            self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed = True
        for stream in self.streams.values():
            stream.close()
        for task in self._tasks:
            task.cancel()
        self.extra.close()
        self.pool.close()
        self.mapping.release_later()  # after the sockets: nothing answers the peers meanwhile

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_datagram(self, data: bytes, src: Endpoint) -> None:
        if self.session is not None and not self.closed:
            self.session.receive_datagram(data, src, self._now())
            self._pump()

    def _on_extra_datagram(self, index: int, data: bytes, src: Endpoint) -> None:
        if self.session is not None and not self.closed:
            self.session.receive_on_socket(index, data, src, self._now())
            self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        if not self.closed:
            self.live.handle_timer(self._now())
            self._pump()

    def _pump(self) -> None:
        """Send what the session has to send, hand its events on, arm its timer."""
        session = self.live
        while not self.closed:
            now = self._now()
            for data, dest in session.datagrams_to_send(now):
                self._transmit(data, dest, now)
            event = session.next_event()
            if event is None:
                break
            if isinstance(event, SessionEnded):
                self.ended = event
            elif isinstance(event, StreamWanted):
                self._start(self._open_stream(event.tracker))
            elif isinstance(event, ExtraSockets):
                self.extra.keep_only(event.wanted, event.ip_version)
            self.on_event(event)
        if not self.closed:
            for index, data, dest in session.datagrams_via(self._now()):
                self.extra.send(index, data, dest)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = session.get_timer()
        if when is not None and not self.closed:
            assert self._loop is not None
            self._timer = self._loop.call_at(when, self._on_timer)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The shell's own tasks (opening and reading TCP streams)."""
        return [*self._tasks, *(s.task for s in self.streams.values() if s.task is not None)]

    def _start(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_stream(self, tracker: Endpoint) -> None:
        stream = TrackerStream(tracker, lambda data: self._on_datagram(data, tracker),
                               lambda why: self._on_stream_gone(tracker, why))
        try:
            await stream.open(self.bind)
        except (OSError, asyncio.TimeoutError) as exc:
            if not self.closed:
                self.live.stream_failed(tracker, f"TCP to {tracker}: {exc or 'timed out'}", self._now())
                self._pump()
            return
        if self.closed:
            stream.close()
            return
        self.streams[tracker] = stream
        self.live.stream_opened(tracker, self._now())
        self._pump()

    def _on_stream_gone(self, tracker: Endpoint, why: str) -> None:
        stream = self.streams.pop(tracker, None)
        if stream is not None:
            stream.close()
        if not self.closed:
            self.live.stream_failed(tracker, why, self._now())
            self._pump()

    def _transmit(self, data: bytes, dest: Endpoint, now: float) -> None:
        stream = self.streams.get(dest)
        if stream is not None:
            stream.send(data)
            return
        client = self.clients.get(_family(dest))
        if client is None:
            self.live.send_failed(dest, f"cannot send to {dest}: no socket of its address family", now)
            return
        try:
            client.send(dest, data)
        except NattoolError as exc:
            self.live.send_failed(dest, str(exc), now)

    # -- the port mapping ------------------------------------------------------------

    def _report_mapping(self, report: PortMapped) -> None:
        """The mapping's news: to the session while it runs, else to the owner."""
        if self.session is not None and not self.closed and self.session.ended is None:
            self.session.port_mapping(report, self._now())
            self._pump()
        else:
            self.on_event(report)

    async def aclose(self) -> None:
        """close(), and wait for the port mapping's deletion (bounded by the mapper)."""
        self.close()
        if self.mapping.releasing is not None:
            await self.mapping.releasing


def _family(ep: Endpoint) -> int:
    return socket.AF_INET6 if ep.ip.version == 6 else socket.AF_INET


# --------------------------------------------------------------------------- the CLI's run


async def connect_session(config: SessionConfig, emit: OnEvent, *, port: int = DEFAULT_CONNECT_PORT,
                          bind: Optional[str] = None, read_stdin: bool = True,
                          retune: Optional[Retune] = None) -> int:
    """`nattool connect`: run a session with stdin as the outgoing chat (each line goes
    to every connected peer; end of input leaves once they are delivered). Returns the
    exit code; raises NetworkError when no tracker can even be sent to. ``retune``
    runs alongside and may change the keepalive intervals (`--keepalive auto`'s
    background measurement)."""
    done: asyncio.Future[SessionEnded] = asyncio.get_running_loop().create_future()

    def on_event(event: ConnectEvent) -> None:
        emit(event)
        if isinstance(event, SessionEnded) and not done.done():
            done.set_result(event)

    shell = SessionShell(config, on_event, port=port, bind=bind)
    await shell.open()
    terminated = _on_sigterm(lambda: done.done() or done.set_result(SessionEnded(ExitCode.OK, "terminated")))
    reader = asyncio.create_task(_pump_stdin(shell)) if read_stdin and not config.once else None
    tuner = asyncio.create_task(retune(shell.set_keepalive)) if retune is not None else None
    try:
        ended = await done
        if ended.exit_code == ExitCode.UNREACHABLE:
            raise NetworkError(ended.reason)
        return int(ended.exit_code)
    finally:
        if tuner is not None:
            tuner.cancel()
            await asyncio.gather(tuner, return_exceptions=True)
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        try:
            if shell.ended is None:
                shell.leave()  # Ctrl-C, SIGTERM: the peers hear it now, not after --dead-after
                await shell.linger()
            await shell.aclose()  # the gateway's mapping goes with us, Ctrl-C or not
        except asyncio.CancelledError:
            pass  # a second Ctrl-C: close now
        finally:
            terminated()
            shell.close()


def _on_sigterm(stop: Callable[[], object]) -> Callable[[], None]:
    """SIGTERM ends the run as Ctrl-C does (leave, delete the port mapping), exit 0; the
    returned function puts the default handling back."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGTERM)


async def _pump_stdin(shell: SessionShell) -> None:
    read_line = await _line_reader()
    while True:
        line = await read_line()
        if not line:
            shell.close_when_delivered()
            return
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text:
            shell.send(text.encode("utf-8")[:MAX_BODY])


async def _line_reader() -> Callable[[], Awaitable[bytes]]:
    """stdin, line by line. A terminal, pipe or socket is watched by the event loop; a
    regular file or a device such as /dev/null cannot be (epoll refuses them), and
    reading one never blocks for long, so it is read in a worker thread."""
    loop = asyncio.get_running_loop()
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        mode = 0  # no stdin at all: end of input
    if os.isatty(0) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        reader = asyncio.StreamReader()
        try:
            pipe = os.fdopen(os.dup(0), "rb", 0)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            return reader.readline
        except (ValueError, OSError):
            pass
    stream = sys.stdin.buffer if mode and sys.stdin is not None else None

    def read() -> bytes:
        return stream.readline() if stream is not None else b""

    return lambda: loop.run_in_executor(None, read)


# --------------------------------------------------------------------------- the library API


class PeerConnection:
    """A group's members, reached over direct UDP paths, or through a tracker's relay
    where no direct path opens (see :func:`connect`).

    Datagrams are delivered at most once, in any order, retransmitted until acknowledged
    (a few times within about 5 s). Payloads are authenticated with the group key but
    travel in clear."""

    def __init__(self) -> None:
        self._shell: Optional[SessionShell] = None
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._waiters: set[asyncio.Future[None]] = set()
        self._ended: Optional[SessionEnded] = None
        self._closed = False
        self._tuner: Optional[asyncio.Task[None]] = None  # keepalive="auto"'s measurement
        self._keepalive: Optional[KeepalivePlan] = None

    @property
    def peers(self) -> list[str]:
        """Ids of the members with a path up (hex session ids, as in ``recv()``)."""
        if self._shell is None or self._shell.session is None or self._closed:
            return []
        return self._shell.session.connected_peers()

    @property
    def keepalive(self) -> Optional[KeepalivePlan]:
        """With ``keepalive="auto"``: the keepalive in force and where it came from, once a
        tracker answered (it changes when the background measurement ends); else None."""
        return self._keepalive

    async def send(self, data: bytes, to: Optional[str] = None) -> None:
        """Send one datagram (at most ``nattool.protocol.punch.MAX_BODY`` bytes) to the peer
        ``to``, or to every peer with a path up. NoPath if there is none."""
        self._raise_if_over()
        if len(data) > MAX_BODY:
            raise UsageError(f"datagram of {len(data)} bytes: at most {MAX_BODY}")
        peers = self.peers
        if to is not None and to not in peers:
            raise NoPath(f"no path up to peer {to}")
        if not peers:
            raise NoPath("no peer has a path up")
        assert self._shell is not None
        self._shell.send(bytes(data), to)

    async def recv(self) -> tuple[str, bytes]:
        """The next datagram from any peer: (peer id, payload)."""
        while True:
            if self._inbox:
                return self._inbox.popleft()
            self._raise_if_over()
            await self._changed()

    async def wait_for_peer(self, timeout: Optional[float] = None) -> str:
        """The id of a peer with a path up, as soon as there is one."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    peers = self.peers
                    if peers:
                        return peers[0]
                    self._raise_if_over()
                    await self._changed()
        except TimeoutError:
            raise NoAnswer(f"no path up to any peer within {timeout:g}s") from None

    def close(self) -> None:
        """Say goodbye to the peers and close the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._tuner is not None:
            self._tuner.cancel()
        if self._shell is not None:
            if self._shell.session is not None and not self._shell.session.left:
                self._shell.leave()
            self._shell.close()
        self._notify()

    async def aclose(self) -> None:
        if self._shell is not None and not self._closed:
            self._shell.leave()
            await self._shell.linger()
        self.close()
        if self._shell is not None and self._shell.mapping.releasing is not None:
            await self._shell.mapping.releasing  # the port mapping's deletion
        if self._shell is not None:
            await asyncio.gather(*self._shell.tasks(), return_exceptions=True)  # TCP readers, cancelled
        if self._tuner is not None:
            await asyncio.gather(self._tuner, return_exceptions=True)
        await asyncio.sleep(0)  # let the transports finish closing

    async def __aenter__(self) -> "PeerConnection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _on_event(self, event: ConnectEvent) -> None:
        if isinstance(event, MessageReceived):
            self._inbox.append((event.peer_id, event.data))
        elif isinstance(event, SessionEnded):
            self._ended = event
        elif isinstance(event, KeepaliveSet):
            self._keepalive = event.plan
            return
        elif not isinstance(event, PathUp):
            return
        self._notify()

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _changed(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    def _raise_if_over(self) -> None:
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        ended = self._ended
        if ended is None:
            return
        if ended.exit_code == ExitCode.UNREACHABLE:
            raise NetworkError(ended.reason)
        if ended.exit_code == ExitCode.TIMEOUT:
            raise NoAnswer(ended.reason)
        raise NoPath(ended.reason)


async def connect(
    group: str,
    trackers: Sequence[TrackerLike] | TrackerLike,
    *,
    port: int = DEFAULT_CONNECT_PORT,
    identity: Optional[str] = None,
    timeout: float = 30.0,
    bind: Optional[str] = None,
    lan: Optional[Sequence[str]] = None,
    keepalive: float | str = 20.0,
    dead_after: Optional[float] = None,
    tracker_timeout: float = 2.0,
    retries: int = 3,
    relay: RelayMode | str = RelayMode.AUTO,
    tcp: bool = False,
    birthday_rate: float = DEFAULT_RATE,
    birthday_budget: int = DEFAULT_BUDGET,
    portmap: bool = True,
) -> PeerConnection:
    """Join ``group`` at ``trackers`` (``HOST[:PORT]`` or ``[IPv6]:PORT`` strings) and open
    paths to its members, direct or relayed, as `nattool connect` does.

    ``port``: the local UDP port (0: any); ``identity``: a MAC-shaped id inside the group
    (None: the endpoint the tracker sees); ``lan``: LAN addresses to publish for members
    behind the same public IP (None: the addresses toward the trackers; ``()``: none);
    ``keepalive``: seconds between keepalives on a path, or "auto" (as `connect
    --keepalive auto`: half the mapping lifetime measured on this network, cached by
    `probe --lifetime` or measured in the background, 20 s until then; a
    :class:`~nattool.protocol.connect_events.KeepaliveSet` event says which);
    ``timeout``: when no path is up for that long the session gives up and ``recv()`` /
    ``wait_for_peer()`` raise (NoAnswer: nobody answered or joined; NoPath: no path
    could be opened, the reason says why); ``relay``: "auto" (a tracker's relay for
    members no direct path reaches within a few seconds; direct paths take over when
    they open), "never", or "only"; ``tcp``: reach the trackers over TCP at once (else
    only when none answers over UDP, and only with a relay); ``birthday_rate`` (probes/s)
    and ``birthday_budget`` (probes in all, 0: off): birthday punching between a NAT that
    maps per destination and one that filters by port (see
    :mod:`nattool.protocol.birthday`); ``portmap``: ask the gateway (PCP, NAT-PMP, UPnP
    IGD) to map the port and offer the mapped endpoint to the peers (deleted by
    ``aclose()``; not for trackers on loopback; the registrations wait for the gateway's
    answer, half a second at most). Returns once the sockets
    are open and the registrations are on their way; use ``wait_for_peer()`` to wait
    for a path.
    """
    try:
        group_key = canonical_group(group)
        ident = canonical_mac(identity) if identity is not None else None
        lan_given = parse_lan_list(",".join(lan) or "0") if lan is not None else None
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None
    try:
        relay_mode = RelayMode(relay)
    except ValueError:
        raise UsageError(f"relay must be one of auto, never, only, not {str(relay)[:20]!r}") from None
    if not 0 <= port <= 65535:
        raise UsageError("port must be in 0..65535")
    auto = keepalive == "auto"
    if not auto and (isinstance(keepalive, (str, bool)) or not isinstance(keepalive, (int, float))):
        raise UsageError(f"keepalive must be seconds or 'auto', not {str(keepalive)[:20]!r}")
    interval = 20.0 if auto else float(keepalive)
    dead = dead_after if dead_after is not None else 3 * interval
    if not (timeout > 0 and 0 < interval < dead and tracker_timeout > 0 and 0 <= retries <= 20):
        raise UsageError("want timeout > 0, 0 < keepalive < dead_after, tracker_timeout > 0, retries in 0..20")
    check_birthday_limits(birthday_rate, birthday_budget)
    # Imported here: `import nattool` (a tracker process too) should not load dnspython.
    from nattool.net.resolve import ResolveOptions, resolve_trackers

    targets = await resolve_trackers(as_tracker_specs(trackers), ResolveOptions(timeout=tracker_timeout))
    if not targets:
        raise UsageError("no tracker address to talk to")
    ka = None
    if auto:
        from nattool.diag.keepalive_auto import SessionKeepalive

        ka = SessionKeepalive(None, targets)
        interval = ka.interval
        dead = dead_after if dead_after is not None else 3 * interval
        if not interval < dead:
            raise UsageError(f"dead_after must be longer than the keepalive interval ({interval:g} s)")
    config = SessionConfig(
        group=group_key,
        trackers=tuple(targets),
        lan=lan_addresses(targets) if lan_given is None else lan_given,
        identity=ident,
        timeout=timeout,
        keepalive=interval,
        dead_after=dead,
        tracker_timeout=tracker_timeout,
        retries=retries,
        relay=relay_mode,
        tcp=tcp,
        birthday_rate=birthday_rate,
        birthday_budget=birthday_budget,
        portmap=portmap,
    )
    conn = PeerConnection()
    on_event: OnEvent = conn._on_event
    if ka is not None:
        config = dataclasses.replace(config, register_every=ka.register_every(config.register_every))
        on_event = ka.announcing(conn._on_event)
    shell = SessionShell(config, on_event, port=port, bind=bind)
    await shell.open()
    conn._shell = shell
    if ka is not None and ka.retune is not None:
        conn._tuner = asyncio.create_task(ka.retune(shell.set_keepalive))
    return conn


__all__ = [
    "DEFAULT_CONNECT_PORT",
    "ConnectionClosed",
    "NoPath",
    "PeerConnection",
    "SessionShell",
    "connect",
    "connect_session",
]
