"""How `nattool connect` shows its session's events: chat lines on stdout, status on
stderr, or, with --json, one JSON object per event."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

from nattool.cli.keepalive_opt import keepalive_text
from nattool.cli.output import stderr, verbosity
from nattool.protocol.connect_events import BirthdayEnded, BirthdayStarted
from nattool.protocol.connect_events import (
    ConnectEvent,
    GaveUp,
    MemberSeen,
    MessageReceived,
    PathDown,
    PathUp,
    PortMapped,
    Queued,
    Registered,
    RelayAllocated,
    RelayLost,
    StreamWanted,
    Undelivered,
)
from nattool.protocol.connect_events import KeepaliveSet


class Renderer:
    """Events to the terminal: chat lines on stdout, status on stderr; or, with --json,
    every event as one compact JSON object per line on stdout."""

    def __init__(self, json_out: bool) -> None:
        self.json_out = json_out
        self.t0 = time.monotonic()

    def __call__(self, event: ConnectEvent) -> None:
        fields = event_fields(event)
        if fields is None:
            return
        if self.json_out:
            out = {"event": fields.pop("event"), "t": round(time.monotonic() - self.t0, 3)}
            out.update(fields)
            sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
            sys.stdout.flush()
            return
        if isinstance(event, MessageReceived):
            sys.stdout.write(f"<{fields['peer']}> {fields['text']}\n")
            sys.stdout.flush()
            return
        text = _human(fields)
        if text is not None and (verbosity() >= 0 or isinstance(event, GaveUp)):
            stderr.print(text, markup=False)


def event_fields(e: ConnectEvent) -> Optional[dict[str, Any]]:
    """An event as the JSON object --json prints (None: not shown)."""
    if isinstance(e, KeepaliveSet):
        return {"event": "keepalive", **e.plan.to_json()}
    if isinstance(e, Registered):
        return {"event": "registered", "tracker": e.tracker.to_text(), "public": e.public.to_text(), "form": e.form}
    if isinstance(e, MemberSeen):
        return {"event": "member_seen", "member": e.member.to_text(), "lan": list(e.lan),
                "tracker": e.tracker.to_text()}
    if isinstance(e, PathUp):
        return {"event": "path_up", "peer": e.endpoint.to_text(), "peer_id": e.peer_id, "path": e.kind.value,
                "via": e.via, "method": e.method.value, "rtt_ms": round(e.rtt * 1000, 3), "open_s": round(e.open_time, 3),
                "since_start_s": round(e.since_start, 3), "observed_as": e.observed_as}
    if isinstance(e, PathDown):
        return {"event": "path_down", "peer": e.endpoint.to_text() if e.endpoint else None, "peer_id": e.peer_id,
                "path": e.kind.value, "via": e.via, "reason": e.reason}
    if isinstance(e, MessageReceived):
        return {"event": "message", "peer": e.endpoint.to_text(), "peer_id": e.peer_id,
                "text": sanitize(e.data.decode("utf-8", "replace"))}
    if isinstance(e, GaveUp):
        out: dict[str, Any] = {"event": "gave_up", "member": e.member.to_text() if e.member else None,
                               "impossible": e.impossible, "reason": e.reason}
        if e.verdict is not None:
            v = e.verdict
            out["mapping"] = {"self": v.mine, "self_reason": v.mine_reason, "peer": v.theirs,
                              "peer_reason": v.theirs_reason}
        if e.tried is not None:
            out["tried_s"] = round(e.tried, 3)
        return out
    if isinstance(e, StreamWanted):
        return {"event": "tcp", "tracker": e.tracker.to_text(), "reason": e.reason}
    if isinstance(e, RelayAllocated):
        return {"event": "relay", "server": e.server.to_text(), "relayed": e.relayed.to_text()}
    if isinstance(e, RelayLost):
        return {"event": "relay_lost", "server": e.server.to_text() if e.server else None, "reason": e.reason}
    if isinstance(e, Queued):
        return {"event": "queued", "reason": "no path up yet: the line waits for the first peer"}
    if isinstance(e, Undelivered):
        out = {"event": "undelivered", "peer_id": e.peer_id, "reason": e.reason}
        if e.endpoint is not None:
            out["peer"] = e.endpoint.to_text()
        return out
    if isinstance(e, PortMapped):
        return _portmap_fields(e)
    if isinstance(e, (BirthdayStarted, BirthdayEnded)):
        return _birthday_fields(e)
    return None  # SessionEnded: the exit status says it; ExtraSockets: the shell's business


def _birthday_fields(e: BirthdayStarted | BirthdayEnded) -> dict[str, Any]:
    if isinstance(e, BirthdayStarted):
        return {"event": "birthday", "member": e.member.to_text(), "role": e.role, "method": e.method.value,
                "pattern": e.pattern, "reason": e.reason, "rate": e.rate, "budget": e.budget}
    return {"event": "birthday_end", "member": e.member.to_text(), "method": e.method.value, "up": e.up,
            "probes": e.probes, "elapsed_s": round(e.elapsed, 3), "reason": e.reason}


def _portmap_fields(e: PortMapped) -> dict[str, Any]:
    out: dict[str, Any] = {"event": "portmap", "change": e.change.value, "protocol": e.protocol,
                           "external": e.external.to_text() if e.external else None}
    if e.lifetime is not None:
        out["lifetime_s"] = round(e.lifetime, 3)
    if e.tracker is not None:
        out["tracker"] = e.tracker.to_text()
    if e.reason:
        out["reason"] = e.reason
    return out


def sanitize(text: str) -> str:
    """A peer's line as it may reach a terminal: no control characters (no escape
    sequences that could rewrite the screen), tabs kept."""
    return "".join(ch if ch == "\t" or ch.isprintable() else "\ufffd" for ch in text.rstrip("\r\n"))


def _human(e: dict[str, Any]) -> Optional[str]:
    kind = e["event"]
    if kind == "keepalive":
        return keepalive_text(e)
    if kind == "registered":
        return f"registered at {e['tracker']}: public endpoint {e['public']}"
    if kind == "member_seen":
        lan = f" (LAN {', '.join(e['lan'])})" if e["lan"] else ""
        return f"member {e['member']}{lan}: punching"
    if kind == "path_up":
        via = {"lan": "LAN", "relay": "relay"}.get(e["via"], "Internet")
        how = "" if e["method"] in ("punch", "lan", "relay") else f" ({e['method']})"
        return (f"path up to {e['peer']} via {via}{how}: "
                f"rtt {e['rtt_ms']:.1f} ms, opened in {e['open_s']:.2f} s")
    if kind == "path_down":
        return f"path down to {e['peer']} via {e['via']} ({e['reason']}): trying again"
    if kind == "tcp":
        return f"{e['reason']}: trying TCP to {e['tracker']}"
    if kind == "relay":
        return f"relay at {e['server']}: relayed endpoint {e['relayed']}"
    if kind == "relay_lost" and e["server"] is not None:
        return f"relay lost: {e['reason']}"
    if kind == "portmap":
        return _portmap_human(e)
    if kind == "gave_up":
        who = e.get("member") or "group"
        head = "impossible" if e.get("impossible") else "gave up"
        lines = [f"{head}: {who}: {e['reason']}"]
        mapping = e.get("mapping")
        if mapping:
            lines.append(f"  your mapping: {mapping['self'] or 'unknown'} ({mapping['self_reason']})")
            lines.append(f"  peer mapping: {mapping['peer'] or 'unknown'} ({mapping['peer_reason']})")
        return "\n".join(lines)
    if kind == "birthday":
        return f"{e['member']}: {e['reason']} ({e['role']}, {e['rate']:g}/s, at most {e['budget']} probes)"
    if kind == "birthday_end":
        return f"{e['member']}: {e['method']} over after {e['probes']} probes in {e['elapsed_s']:.1f} s: {e['reason']}"
    if kind == "queued":
        return "no peer connected yet: the line will be sent when a path is up"
    if kind == "undelivered":
        return f"line not delivered to {e.get('peer') or 'anyone'}: {e['reason']}"
    return None


def _portmap_human(e: dict[str, Any]) -> str:
    change, ext = e["change"], e["external"]
    proto = {"pcp": "PCP", "natpmp": "NAT-PMP", "upnp": "UPnP IGD"}.get(e["protocol"] or "", e["protocol"])
    why = f" ({e['reason']})" if e.get("reason") else ""
    if change in ("granted", "renewed"):
        verb = "granted" if change == "granted" else "renewed"
        return f"port mapping {verb} by {proto}: {ext} for {e.get('lifetime_s', 0):g} s, offered to the peers"
    if change == "lost":
        return f"port mapping {ext} lost{why}: the peers get the endpoint the trackers see"
    if change == "refused":
        return (f"tracker {e['tracker']} refused the mapped endpoint {ext}{why}: "
                "registered there with the endpoint it sees")
    if change == "deleted":
        return f"port mapping {ext} deleted"
    return f"no port mapping{why}"


__all__ = ["Renderer", "event_fields", "sanitize"]
