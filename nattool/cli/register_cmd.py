"""`nattool register GROUP`: join a group and list its members."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Optional

import typer
from rich.table import Table

from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, RetriesOpt, TimeoutOpt, TrackerOpt
from nattool.cli.node_args import parse_identity, parse_lan
from nattool.cli.output import emit_json, info, run_edge, stdout
from nattool.cli.targets import check_timing, client_settings, resolve_targets, run
from nattool.errors import ProtocolError, UsageError
from nattool.exit_codes import ExitCode
from nattool.net.client import ClientPool
from nattool.net.tracker_client import Registrar, TrackerAnswer
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import MemberEntry, MemberList, RegisterRequest, canonical_group

# Padding lets the tracker send a longer list (its reply may be 3x the request).
PAD_TO = 400


def register(
    group: Annotated[str, typer.Argument(metavar="GROUP", help="Group key shared by the members (usually a UUID), or 'new' to make one.")],
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    public: Annotated[str, typer.Option("--public", metavar="IP:PORT", help="'0' to use the endpoint the tracker sees, or IP:PORT where this node listens itself.")] = "0",
    lan: Annotated[str, typer.Option("--lan", metavar="LAN", help="LAN addresses for peers behind the same public IP: 'auto', '0' (none) or a comma list.")] = "auto",
    node_id: Annotated[str, typer.Option("--id", metavar="ID", help="Identity inside the group: 'auto' (a stable MAC of this host), a MAC, or '0' (none).")] = "auto",
    keepalive: Annotated[Optional[float], typer.Option("--keepalive", metavar="SECONDS", help="Stay running and re-register every SECONDS, showing members joining and leaving.", show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", "-p", metavar="PORT", help="Local UDP port to register from (0: any).")] = 0,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Register in GROUP at every tracker and list the group's members."""

    def body() -> int:
        settings = client_settings(tracker, domain, timeout, retries, config)
        check_timing(settings.timeout, settings.retries)
        group_key = _group(group)
        if keepalive is not None and not 1 <= keepalive <= 3600:
            raise UsageError("--keepalive must be in 1..3600 seconds")
        if not 0 <= port <= 65535:
            raise UsageError("--port must be in 0..65535")
        explicit_public = _public(public)
        identity = parse_identity(node_id)
        return run(_main(settings, group_key, explicit_public, lan, identity, keepalive, port, json_out))

    raise typer.Exit(run_edge(body))


def _group(text: str) -> str:
    if text == "new":
        value = str(uuid.uuid4())
        info(f"new group: {value}")
        return value
    try:
        return canonical_group(text)
    except ProtocolError:
        raise UsageError(f"bad group {text[:70]!r}: 1..64 characters of A-Z a-z 0-9 . _ -") from None


def _public(text: str) -> Endpoint | None:
    if text == "0":
        return None
    try:
        return Endpoint.from_text(text)
    except ProtocolError:
        raise UsageError(f"bad --public {text[:70]!r}: want 0, IP:PORT or [IPv6]:PORT") from None




async def _main(settings, group: str, public, lan_text: str, identity, keepalive, port: int, json_out: bool) -> int:  # type: ignore[no-untyped-def]
    targets = await resolve_targets(settings)
    lan = parse_lan(lan_text, targets)
    request = RegisterRequest(group=group, public=public, lan=lan, identity=identity, padding=0)
    wire_len = len(request.to_wire())
    request = RegisterRequest(group=group, public=public, lan=lan, identity=identity, padding=max(0, PAD_TO - wire_len - 1))
    async with ClientPool(port) as pool:
        registrar = Registrar(pool, settings.timeout, settings.retries)
        answers = await registrar.register_all(targets, request)
        if keepalive is None:
            return _render_once(group, answers, json_out)
        return await _keepalive_loop(registrar, targets, request, group, answers, keepalive, json_out)


def _merge(answers: list[TrackerAnswer]) -> tuple[MemberEntry | None, list[MemberEntry]]:
    me: MemberEntry | None = None
    members: list[MemberEntry] = []
    for answer in answers:
        if not answer.ok:
            continue
        entries = answer.value.entries  # type: ignore[union-attr]
        if me is None:
            me = entries[0]
        for entry in entries[1:]:
            if entry.endpoint not in [m.endpoint for m in members] and entry.endpoint != me.endpoint:
                members.append(entry)
    return me, members


def _entry_json(entry: MemberEntry) -> dict[str, object]:
    return {"endpoint": entry.endpoint.to_text(), "lan": list(entry.lan)}


def _render_once(group: str, answers: list[TrackerAnswer], json_out: bool) -> int:
    me, members = _merge(answers)
    code = int(ExitCode.OK) if me is not None else int(ExitCode.TIMEOUT)
    if json_out:
        emit_json(
            {
                "group": group,
                "self": _entry_json(me) if me else None,
                "members": [_entry_json(m) for m in members],
                "trackers": [
                    {
                        "tracker": a.tracker.to_text(),
                        "ok": a.ok,
                        "form": a.form,
                        "rtt_ms": round(a.rtt * 1000, 3) if a.rtt is not None else None,
                        "error": a.error,
                    }
                    for a in answers
                ],
            }
        )
        return code
    for a in answers:
        if not a.ok:
            stdout.print(f"[red]{a.tracker}: {a.error}[/red]")
    if me is None:
        stdout.print("No tracker accepted the registration.")
        return code
    stdout.print(f"group [bold]{group}[/bold]: registered as {me.to_text()}")
    table = Table(box=None, pad_edge=False)
    table.add_column("member")
    table.add_column("LAN addresses (same public IP as you)")
    for m in members:
        table.add_row(m.endpoint.to_text(), ", ".join(m.lan) or "-")
    if members:
        stdout.print(table)
    else:
        stdout.print("no other members yet")
    return code


async def _keepalive_loop(registrar: Registrar, targets, request, group, answers, interval: float, json_out: bool) -> int:  # type: ignore[no-untyped-def]
    known: dict[str, MemberEntry] = {}
    first = True
    while True:
        me, members = _merge(answers)
        current = {m.endpoint.to_text(): m for m in members}
        stamp = time.strftime("%H:%M:%S")
        if first and me is not None:
            if json_out:
                emit_json({"event": "registered", "group": group, "self": _entry_json(me)})
            else:
                stdout.print(f"{stamp} registered in {group} as {me.to_text()}")
        elif me is None:
            if json_out:
                emit_json({"event": "unreachable", "errors": [a.error for a in answers]})
            else:
                stdout.print(f"{stamp} [red]no tracker answered[/red]")
        first = first and me is None
        for key, m in current.items():
            if key not in known:
                if json_out:
                    emit_json({"event": "joined", **_entry_json(m)})
                else:
                    stdout.print(f"{stamp} + {m.to_text()}")
        for key, m in known.items():
            if key not in current and me is not None:
                if json_out:
                    emit_json({"event": "left", **_entry_json(m)})
                else:
                    stdout.print(f"{stamp} - {m.to_text()}")
        if me is not None:
            known = current
        await asyncio.sleep(interval)
        answers = await registrar.register_all(targets, request)


__all__ = ["register", "MemberList"]
