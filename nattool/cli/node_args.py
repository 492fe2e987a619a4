"""The node's own settings that `register` and `connect` both take: --id and --lan."""

from __future__ import annotations

from typing import Sequence

from nattool.errors import ProtocolError, UsageError
from nattool.net.localinfo import lan_addresses, stable_node_id
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import canonical_mac, parse_lan_list


def parse_identity(text: str) -> str | None:
    """``0`` (the endpoint the tracker sees is the identity), ``auto`` (a stable MAC of
    this host) or a MAC in any common spelling."""
    if text == "0":
        return None
    if text == "auto":
        return stable_node_id()
    try:
        return canonical_mac(text)
    except ProtocolError:
        raise UsageError(f"bad --id {text[:40]!r}: want auto, 0 or a MAC like aa:bb:cc:dd:ee:ff") from None


def parse_lan(text: str, trackers: Sequence[Endpoint]) -> tuple[str, ...]:
    """``auto`` (the local addresses toward the trackers), ``0`` (none) or a comma list."""
    if text == "auto":
        return lan_addresses(trackers)
    try:
        return parse_lan_list(text)
    except ProtocolError as exc:
        raise UsageError(f"bad --lan {text[:70]!r}: {exc}; want auto, 0 or a comma list of IPs") from None
