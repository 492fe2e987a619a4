"""The SQLite log's rows: the members one batch registered at one instant, as one
text, and back.

A member is its five text fields joined by US, the members of one row joined by
RS (none of the fields can hold control characters). The endpoint is kept as the
wire text the member already carries and validated when the log is replayed.
"""

from __future__ import annotations

from typing import Sequence

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import Member

FIELD_SEP = "\x1f"  # fields of one member
MEMBER_SEP = "\x1e"  # members within one row (schema 2)

# A clean close writes a marker row, then every live member (see sqlite_lone.py).
# A marker's seen is no real time, so versions that know no markers take it for a
# dead row.
SNAPSHOT_SEEN = -1.0
SNAPSHOT_MARK = "snapshot"


def encode_rows(members: Sequence[Member]) -> list[tuple[float, str]]:
    """One row per run of members registered at the same instant: normally the
    whole batch (the server stamps one event-loop wake-up with one clock reading)."""
    rows: list[tuple[float, str]] = []
    start, n = 0, len(members)
    while start < n:
        seen = members[start].seen
        end = start + 1
        while end < n and members[end].seen == seen:
            end += 1
        rows.append((seen, MEMBER_SEP.join([
            f"{m.group}{FIELD_SEP}{m.identity}{FIELD_SEP}{m.endpoint_text}{FIELD_SEP}{m.lan_text}{FIELD_SEP}{m.source}"
            for m in members[start:end]
        ])))
        start = end
    return rows


def decode_row(seen: float, rec: str) -> list[Member]:
    """The members of one log row, in the order they registered."""
    return [_decode_member(seen, part) for part in rec.split(MEMBER_SEP)]


def decode_sibling_row(seen: float, rec: str) -> list[Member]:
    """The members of a row that a sibling worker appended during this run: it
    wrote them from members its own index had accepted, so they are taken as they
    are. Parsing each endpoint again cost a third of a worker's time."""
    return [Member(*part.split(FIELD_SEP), seen) for part in rec.split(MEMBER_SEP)]  # type: ignore[call-arg]


def _decode_member(seen: float, rec: str) -> Member:
    fields = rec.split(FIELD_SEP)
    if len(fields) != 5:
        raise ProtocolError("bad log record")
    grp, identity, endpoint, lan, source = fields
    return Member(
        group=grp,
        identity=identity,
        endpoint=Endpoint.canonical_text(endpoint),
        lan=lan,
        source=source,
        seen=float(seen),
    )


__all__ = ["SNAPSHOT_MARK", "SNAPSHOT_SEEN", "decode_row", "decode_sibling_row", "encode_rows"]
