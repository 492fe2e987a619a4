"""The amplification rule that bounds every reply (PROTOCOL.md section 5)."""

from __future__ import annotations

SAFE_DATAGRAM = 1200  # bytes: fits every path MTU that IPv6 guarantees, with headers
MIN_REPLY_ROOM = 128  # room for a full RFC 5780 answer to a bare 20-byte Binding request
AMPLIFICATION_FACTOR = 3


def reply_budget(request_len: int, safe_datagram: int = SAFE_DATAGRAM) -> int:
    """Largest reply, in bytes, that may answer a request of ``request_len`` bytes."""
    return min(max(AMPLIFICATION_FACTOR * request_len, MIN_REPLY_ROOM), safe_datagram)
