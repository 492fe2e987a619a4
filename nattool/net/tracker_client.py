"""The text-protocol client procedures: whoami, register, trackers.

They speak both dialects: our server's, and the original Go server's (which never
answers the seed 4-field registration; a tracker that stays silent to it is asked
again in the original client's 3-field form, and that choice is remembered).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from nattool.errors import NattoolError, NetworkError, NoAnswer, ProtocolError, TrackerRefused
from nattool.net.client import Answer, ClientPool
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import ErrorReply, MemberList, NatReply, RegisterRequest, TrackerList, TrackersRequest

T = TypeVar("T")

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
    exc: NattoolError | None = None  # the error behind ``error``, for its class


def deciding_error(answers: Sequence[TrackerAnswer]) -> NattoolError | None:
    """Why no tracker answered (None if one did): the most telling of their errors.

    A refusal says most (exit 1), then a garbled answer, then silence (exit 3); only
    when every tracker was unreachable (no route, no socket) is the verdict exit 4.
    """
    if not answers or any(a.ok for a in answers):
        return None
    errors = [a.exc for a in answers if a.exc is not None]
    for kind in (TrackerRefused, ProtocolError, NoAnswer, NetworkError, NattoolError):
        found = [e for e in errors if isinstance(e, kind)]
        if found:
            if len(answers) == 1:
                return found[0]
            return type(found[0])("no tracker answered: " + "; ".join(str(a.error) for a in answers))
    return NoAnswer("no tracker answered")


def _refusal_or(parse: Callable[[bytes], T], tracker: Endpoint) -> Callable[[bytes], T]:
    """``parse``, except that an ERR reply raises TrackerRefused (the tracker said no)."""

    def parse_reply(data: bytes) -> T:
        try:
            refusal = ErrorReply.from_wire(data)
        except ProtocolError:
            return parse(data)
        raise TrackerRefused(f"tracker {tracker} refused: {refusal.reason}")

    return parse_reply


async def _ask(
    pool: ClientPool, tracker: Endpoint, payload: bytes, parse: Callable[[bytes], object], timeout: float, retries: int
) -> TrackerAnswer:
    try:
        client = await pool.for_endpoint(tracker)
        answer: Answer[object] = await client.request(
            tracker, payload, _refusal_or(parse, tracker), timeout=timeout, retries=retries
        )
    except NattoolError as exc:
        return TrackerAnswer(tracker, False, error=str(exc), exc=exc)
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
        if second.ok or not _is_silence(second):
            return second  # accepted, or refused: the original form was understood
        error = f"{first.error} (also tried the original client's form)"
        return TrackerAnswer(tracker, False, error=error, exc=NoAnswer(error))

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
    return isinstance(answer.exc, NoAnswer)


__all__ = ["NoAnswer", "Registrar", "TrackerAnswer", "deciding_error", "list_trackers", "whoami"]
