"""The text-protocol client procedures: whoami, register, trackers.

They speak both dialects: our server's, and the original Go server's (which never
answers the seed 4-field registration; a tracker that stays silent to it is asked
again in the original client's 3-field form, and that choice is remembered).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence

from nattool.errors import NattoolError, NoAnswer
from nattool.net.client import Answer, ClientPool
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import MemberList, NatReply, RegisterRequest, TrackerList, TrackersRequest

NAT_REQUEST = b"//nat"


@dataclass(frozen=True, slots=True)
class TrackerAnswer:
    tracker: Endpoint
    ok: bool
    value: object = None  # Endpoint | MemberList | TrackerList
    rtt: float | None = None
    attempts: int = 0
    error: str | None = None
    form: str | None = None  # registration form the tracker accepted


async def _ask(pool: ClientPool, tracker: Endpoint, payload: bytes, parse, timeout: float, retries: int) -> TrackerAnswer:  # type: ignore[no-untyped-def]
    try:
        client = await pool.for_endpoint(tracker)
        answer: Answer[object] = await client.request(tracker, payload, parse, timeout=timeout, retries=retries)
    except NattoolError as exc:
        return TrackerAnswer(tracker, False, error=str(exc))
    return TrackerAnswer(tracker, True, answer.value, answer.rtt, answer.attempts)


async def whoami(pool: ClientPool, trackers: Sequence[Endpoint], timeout: float, retries: int) -> list[TrackerAnswer]:
    """Ask every tracker, from one socket per family, what endpoint it sees."""

    def parse(data: bytes) -> Endpoint:
        return NatReply.from_wire(data).endpoint

    return list(await asyncio.gather(*(_ask(pool, t, NAT_REQUEST, parse, timeout, retries) for t in trackers)))


async def list_trackers(pool: ClientPool, trackers: Sequence[Endpoint], timeout: float, retries: int) -> list[TrackerAnswer]:
    payload = TrackersRequest().to_wire()
    return list(
        await asyncio.gather(*(_ask(pool, t, payload, TrackerList.from_wire, timeout, retries) for t in trackers))
    )


@dataclass
class Registrar:
    """Registers one node at several trackers, remembering each tracker's dialect."""

    pool: ClientPool
    timeout: float
    retries: int
    forms: dict[Endpoint, str] = field(default_factory=dict)

    async def register(self, tracker: Endpoint, request: RegisterRequest) -> TrackerAnswer:
        form = self.forms.get(tracker, "seed")
        first = await self._try(tracker, request, form)
        if first.ok or form == "original" or not _is_silence(first):
            return first
        # The original server never answers the seed form: ask in its own form.
        second = await self._try(tracker, request, "original")
        if second.ok:
            return second
        return TrackerAnswer(tracker, False, error=f"{first.error} (also tried the original client's form)")

    async def _try(self, tracker: Endpoint, request: RegisterRequest, form: str) -> TrackerAnswer:
        req = RegisterRequest(
            group=request.group,
            public=request.public,
            lan=request.lan,
            identity=request.identity,
            form=form,
            # The original server has never seen a newline: send it its own form bare.
            extensions=request.extensions if form == "seed" else {},
            padding=request.padding if form == "seed" else 0,
        )
        # While the dialect is unknown, each form gets half of the timeout, so that
        # --timeout bounds the whole registration, fallback included.
        unknown = tracker not in self.forms
        timeout = self.timeout / 2 if unknown else self.timeout
        answer = await _ask(self.pool, tracker, req.to_wire(), MemberList.from_wire, timeout, self.retries)
        if answer.ok:
            self.forms[tracker] = form
            return TrackerAnswer(tracker, True, answer.value, answer.rtt, answer.attempts, form=form)
        return answer

    async def register_all(self, trackers: Sequence[Endpoint], request: RegisterRequest) -> list[TrackerAnswer]:
        return list(await asyncio.gather(*(self.register(t, request) for t in trackers)))


def _is_silence(answer: TrackerAnswer) -> bool:
    return answer.error is not None and answer.error.startswith("no answer")


__all__ = ["NoAnswer", "Registrar", "TrackerAnswer", "list_trackers", "whoami"]
