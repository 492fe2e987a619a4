"""Registry rules: who becomes which member, and what a registration reply says."""

from __future__ import annotations

from typing import Iterable, Sequence

from nattool.protocol.endpoint import Endpoint, endpoint_source_key
from nattool.protocol.text import MalformedRequest, MemberList, RegisterRequest
from nattool.store.base import ENDPOINT_TEXT_OF, SOURCE_OF, GroupView, Member, Registration

# A reply line is at least "1.2.3.4:5\n": never ask a store for more than fits.
MAX_PAGE = 128


def member_from_request(req: RegisterRequest, observed: Endpoint, now: float) -> Member:
    """Turn a registration into the member the store keeps.

    An explicit public endpoint must carry the observed source IP: otherwise anyone
    could point a whole group's traffic at a third party.
    """
    endpoint = observed
    if req.public is not None:
        if req.public.ip != observed.ip:
            raise MalformedRequest("public ip differs from source ip")
        endpoint = req.public
    identity = req.identity if req.identity is not None else observed.to_text()
    return Member(
        group=req.group,
        identity=identity,
        endpoint=endpoint,
        lan=req.lan,
        source=endpoint_source_key(observed),
        seen=now,
    )


def registration_for(req: RegisterRequest, member: Member, budget: int = 1200) -> Registration:
    # Ask the store for no more members than could fit: a reply line is at least
    # "1.2.3.4:5" plus its newline.
    return Registration(member=member, offset=req.offset, limit=min(MAX_PAGE, budget // 10))


def _line(other: Member, source: str) -> str:
    """A member's reply line: its LAN list only for a requester behind the same IP."""
    if other.lan_text and other.source == source:
        return f"{other.endpoint_text};{other.lan_text}"
    return other.endpoint_text


def own_line(endpoint_text: str, lan_text: str, budget: int) -> str:
    """The requester's own line, first in its reply: with its LAN list, unless that
    alone would not fit ``budget``."""
    line = f"{endpoint_text};{lan_text}" if lan_text else endpoint_text
    return line if len(line) <= budget else endpoint_text


def cut_lines(lines: list[str], others: Iterable[str], budget: int, reserve: int = 0) -> int:
    """Append the lines of ``others`` (newest first) to ``lines`` while the reply,
    newline-joined, stays ``reserve`` bytes within ``budget``: the newest that fit.
    Return how many went in."""
    used = sum(map(len, lines)) + len(lines) - 1
    shown = 0
    for line in others:
        used += 1 + len(line)
        if used + reserve > budget:
            break
        lines.append(line)
        shown += 1
    return shown


def plain_reply(first_line: str, others: Sequence[Member], source: str, budget: int) -> bytes | None:
    """The usual reply, or None when :func:`build_member_reply` must decide: nobody
    else is behind the requester's IP, so every other line is a bare endpoint
    (joined without a bytecode per member), and all of it fits ``budget``."""
    if source in list(map(SOURCE_OF, others)):
        return None
    whole = "\n".join([first_line, *map(ENDPOINT_TEXT_OF, others)])
    return whole.encode("ascii") if len(whole) <= budget else None


def lines_reply(first_line: str, others: str, budget: int) -> bytes | None:
    """The usual reply from the others' endpoint lines (a keepalive lane's
    :attr:`LaneAnswer.lines`), when none of them is behind the requester's source;
    None when it does not all fit ``budget``."""
    whole = f"{first_line}\n{others}" if others else first_line
    return whole.encode("ascii") if len(whole) <= budget else None


def build_member_reply(view: GroupView, budget: int, paging: bool, offset: int = 0) -> bytes:
    """The reply to a registration, cut to ``budget`` bytes, newest members kept.

    The requester's own line comes first and carries its own LAN list; another
    member's LAN list is shown only to requesters behind the same public IP (IPv6:
    the same /64), since only they can use it.
    """
    me = view.me
    lines = [own_line(me.endpoint_text, me.lan_text, budget)]
    source = me.source
    others = view.others
    if not paging:
        # Usually everything fits: build it whole, and walk line by line only
        # when it has to be cut (the same cut: the newest members that fit).
        reply = plain_reply(lines[0], others, source, budget)
        if reply is not None:
            return reply
        whole = "\n".join(lines + [_line(o, source) for o in others])
        if len(whole) <= budget:
            return whole.encode("ascii")
    # Keep room for the "next=N" paging line when the client speaks paging.
    reserve = 12 if paging else 0
    shown = cut_lines(lines, (_line(o, source) for o in others), budget, reserve)
    next_offset: int | None = None
    if paging and offset + shown < view.total_others:
        next_offset = offset + shown
    entries_text = "\n".join(lines)
    if next_offset is not None:
        entries_text += f"\nnext={next_offset}"
    return entries_text.encode("ascii")


__all__ = [
    "MemberList",
    "build_member_reply",
    "cut_lines",
    "lines_reply",
    "member_from_request",
    "own_line",
    "plain_reply",
    "registration_for",
]
