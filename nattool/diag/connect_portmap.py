"""The port mapping of a `connect` socket: asked for when the socket opens, its grant,
renewals and loss told to the session (:meth:`ConnectSession.port_mapping`), deleted
when the run ends (also after Ctrl-C and SIGTERM). The protocols are
:mod:`nattool.net.portmap`'s; this module only connects them to a
:class:`~nattool.diag.connect.SessionShell`."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Optional, Sequence

from nattool.errors import NattoolError
from nattool.protocol.connect_events import MappingChange, PortMapped
from nattool.protocol.endpoint import Endpoint

if TYPE_CHECKING:
    from nattool.net.portmap import PortMapping

PORTMAP_DISCOVERY = 1.0  # s the gateway's PCP, NAT-PMP and UPnP IGD get to answer


def worth_mapping(trackers: Sequence[Endpoint], bind: Optional[str]) -> bool:
    """A mapping can matter: some tracker is beyond loopback (a gateway may be in
    between), and the socket is not bound to loopback."""
    if all(t.ip.is_loopback for t in trackers):
        return False
    return bind is None or not ipaddress.ip_address(bind).is_loopback


class SocketMapping:
    """One socket's mapping. ``report`` gets what the session must hear (GRANTED or
    NONE once, then RENEWED, GRANTED afresh, LOST); ``emit`` what only the owner hears
    (DELETED, or LOST when the gateway did not confirm the deletion), after the session
    is over."""

    def __init__(self, report: Callable[[PortMapped], None], emit: Callable[[PortMapped], None]) -> None:
        self.report = report
        self.emit = emit
        self.mapper: Optional["PortMapping"] = None
        self.external: Optional[Endpoint] = None  # the external endpoint in force
        self._task: Optional[asyncio.Task[None]] = None
        self._started = False  # start() answered: later grants are renewals (or fresh grants)
        self.releasing: Optional[asyncio.Task[None]] = None  # the deletion, once release_later() ran
        self._deleted = False  # the gateway confirmed the deletion

    def start(self, port: int, local_ip: Optional[str]) -> None:
        self._task = asyncio.ensure_future(self._map(port, local_ip))

    async def _map(self, port: int, local_ip: Optional[str]) -> None:
        from nattool.net.portmap import PortMapping

        self.mapper = PortMapping(port, local_ip=local_ip, wait=PORTMAP_DISCOVERY, on_change=self._on_mapper_event)
        try:
            mapping = await self.mapper.start()
            why = "; ".join(f"{proto}: {failed}" for proto, failed in self.mapper.failures.items())
        except NattoolError as exc:
            mapping, why = None, str(exc)
        self._started = True
        if mapping is None:
            self.report(PortMapped(MappingChange.NONE, reason=why))
            return
        self.external = mapping.external
        self.report(PortMapped(MappingChange.GRANTED, mapping.protocol, mapping.external, float(mapping.lifetime)))

    def _on_mapper_event(self, event: object) -> None:
        """A renewal (the external endpoint may move) or the loss, from the mapper's
        background renewal; its first grant comes from start()."""
        from nattool.protocol.portmap_client import MappingDeleted, MappingFailed, MappingGranted

        if isinstance(event, MappingDeleted):
            self._deleted = event.confirmed
        elif isinstance(event, MappingGranted) and self._started:
            # Not a renewal: granted afresh (the gateway forgot us), perhaps elsewhere.
            change = MappingChange.RENEWED if event.renewal else MappingChange.GRANTED
            self.external = event.external
            self.report(PortMapped(change, event.protocol, event.external, float(event.lifetime)))
        elif isinstance(event, MappingFailed) and (event.lost or event.unsupported) and self.external is not None:
            # "unsupported" after a grant: the gateway's port closed (ICMP), the renewals ended.
            lost, self.external = self.external, None
            self.report(PortMapped(MappingChange.LOST, event.protocol, lost, None, event.reason))

    def release_later(self) -> None:
        """Delete in the background (the caller may await ``releasing``)."""
        if self.releasing is None and (self.mapper is not None or self._task is not None):
            self.releasing = _background(self._release())

    async def _release(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # still asking: start() deletes what it may have mapped
            await asyncio.gather(task, return_exceptions=True)
        mapper, self.mapper = self.mapper, None
        if mapper is None:
            return
        held = mapper.mapping
        why = "the gateway did not confirm"
        try:
            await mapper.close()
        except NattoolError as exc:
            why = str(exc)
        if held is None or self.external is None:
            return  # nothing held, or its loss was told already
        if self._deleted:
            self.emit(PortMapped(MappingChange.DELETED, held.protocol, held.external))
        else:  # it expires at the gateway by itself, after its lifetime
            self.emit(PortMapped(MappingChange.LOST, held.protocol, held.external, None, f"not deleted: {why}"))


_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(coro: Coroutine[Any, Any, None]) -> Optional[asyncio.Task[None]]:
    """Run ``coro`` to its end even if nobody waits for it."""
    try:
        task = asyncio.ensure_future(coro)
    except RuntimeError:  # no running loop any more: nothing can be sent
        coro.close()
        return None
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


__all__ = ["PORTMAP_DISCOVERY", "SocketMapping", "worth_mapping"]
