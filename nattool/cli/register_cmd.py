"""`nattool register GROUP`: join a group and list its members."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from nattool.cli.keepalive_opt import AUTO_HELP
from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, RetriesOpt, TimeoutOpt, TrackerOpt
from nattool.errors import UsageError
from nattool.exit_codes import ExitCode

if TYPE_CHECKING:
    from nattool import api
    from nattool.api import Registration
    from nattool.diag.keepalive_auto import AutoKeepalive
    from nattool.protocol.keepalive_rules import KeepalivePlan
    from nattool.protocol.endpoint import Endpoint
    from nattool.protocol.text import MemberEntry


def register(
    group: Annotated[str, typer.Argument(metavar="GROUP", help="Group key shared by the members (usually a UUID), or 'new' to make one.")],
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    public: Annotated[str, typer.Option("--public", metavar="IP:PORT", help="'0' to use the endpoint the tracker sees, or IP:PORT where this node listens itself.")] = "0",
    lan: Annotated[str, typer.Option("--lan", metavar="LAN", help="LAN addresses for peers behind the same public IP: 'auto', '0' (none) or a comma list.")] = "auto",
    node_id: Annotated[str, typer.Option("--id", metavar="ID", help="Identity inside the group: 'auto' (a stable MAC of this host), a MAC, or '0' (none).")] = "auto",
    keepalive: Annotated[Optional[str], typer.Option("--keepalive", metavar="SECONDS|auto", help="Stay running and re-register every SECONDS, showing members joining and leaving; " + AUTO_HELP + ".", show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", "-p", metavar="PORT", help="Local UDP port to register from (0: any).")] = 0,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Register in GROUP at every tracker and list the group's members."""

    from nattool import api
    from nattool.cli.keepalive_opt import parse_keepalive
    from nattool.cli.node_args import parse_identity, parse_lan
    from nattool.cli.output import info, run_edge
    from nattool.cli.targets import check_timing, client_settings, run

    def body() -> int:
        settings = client_settings(tracker, domain, timeout, retries, config)
        check_timing(settings.timeout, settings.retries)
        every = parse_keepalive(keepalive, 1, 3600) if keepalive is not None else None
        group_key = api.group_key(group)
        if group == "new":
            info(f"new group: {group_key}")
        explicit_public = _public(public)
        identity = parse_identity(node_id)
        lan_list = None if lan == "auto" else parse_lan(lan, ())

        async def go() -> int:
            node = await api.Registrant.open(
                group_key,
                settings.trackers,
                public=explicit_public,
                lan=lan_list,
                identity=identity,
                port=port,
                **settings.api_options(),
            )
            async with node:
                if keepalive is None:
                    return _render_once(await node.register(check=False), json_out)
                return await _keepalive_loop(node, _Schedule.start(node, every), json_out)

        return run(go())

    raise typer.Exit(run_edge(body))


def _public(text: str) -> Endpoint | None:
    from nattool.errors import ProtocolError
    from nattool.protocol.endpoint import Endpoint

    if text == "0":
        return None
    try:
        return Endpoint.from_text(text)
    except ProtocolError:
        raise UsageError(f"bad --public {text[:70]!r}: want 0, IP:PORT or [IPv6]:PORT") from None


def _entry_json(entry: MemberEntry) -> dict[str, object]:
    return {"endpoint": entry.endpoint.to_text(), "lan": list(entry.lan)}


def _exit_code(reg: Registration) -> int:
    return int(reg.error.exit_code) if reg.error is not None else int(ExitCode.OK)


def _render_once(reg: Registration, json_out: bool) -> int:
    from rich.markup import escape
    from rich.table import Table

    from nattool.cli.output import emit_json, stdout

    me, members = reg.me, reg.members
    if json_out:
        emit_json(
            {
                "group": reg.group,
                "self": _entry_json(me) if me else None,
                "members": [_entry_json(m) for m in members],
                "trackers": [
                    {
                        "tracker": r.tracker.to_text(),
                        "ok": r.ok,
                        "form": r.form,
                        "rtt_ms": round(r.rtt * 1000, 3) if r.rtt is not None else None,
                        "error": str(r.error) if r.error is not None else None,
                    }
                    for r in reg.replies
                ],
            }
        )
        return _exit_code(reg)
    for r in reg.replies:
        if r.error is not None:
            stdout.print(f"[red]{escape(str(r.error))}[/red]")
    if me is None:
        stdout.print("No tracker accepted the registration.")
        return _exit_code(reg)
    stdout.print(f"group [bold]{reg.group}[/bold]: registered as {me.to_text()}")
    table = Table(box=None, pad_edge=False)
    table.add_column("member")
    table.add_column("LAN addresses (same public IP as you)")
    for m in members:
        table.add_row(m.endpoint.to_text(), ", ".join(m.lan) or "-")
    if members:
        stdout.print(table)
    else:
        stdout.print("no other members yet")
    return _exit_code(reg)


class _Schedule:
    """When to register again: the interval given, or `--keepalive auto`'s, which a
    measurement in the background may change while the loop sleeps."""

    def __init__(self, plan: KeepalivePlan, auto: Optional[AutoKeepalive]) -> None:
        import asyncio

        self.plan = plan
        self.auto = auto
        self.changed = asyncio.Event()

    @classmethod
    def start(cls, node: api.Registrant, every: Optional[float]) -> _Schedule:
        from nattool.cli.keepalive_opt import cli_cache
        from nattool.diag.keepalive_auto import AutoKeepalive
        from nattool.protocol.keepalive_rules import given_keepalive

        if every is not None:
            return cls(given_keepalive(every, every), None)
        auto = AutoKeepalive(node.targets, cache=cli_cache())
        return cls(auto.plan, auto)

    def answered(self, reg: Registration) -> None:
        if self.auto is not None:
            for reply in reg.replies:
                if reply.ok:
                    self.auto.tracker_answered(reply.tracker)

    def apply(self, plan: KeepalivePlan) -> None:
        self.plan = plan
        self.changed.set()

    async def sleep_from(self, started: float) -> None:
        """Until ``started`` + the current interval (a change while asleep counts)."""
        import asyncio

        loop = asyncio.get_running_loop()
        while (left := started + self.plan.register_every - loop.time()) > 0:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return


def _show_plan(plan: KeepalivePlan, json_out: bool) -> None:
    from nattool.cli.keepalive_opt import plan_text
    from nattool.cli.output import emit_json, stdout
    from nattool.protocol.keepalive_rules import KeepaliveSource

    if json_out:
        emit_json({"event": "keepalive", **plan.to_json()})
    elif plan.source is not KeepaliveSource.GIVEN:
        stdout.print(f"{time.strftime('%H:%M:%S')} {plan_text(plan)}", markup=False, highlight=False)


async def _keepalive_loop(node: api.Registrant, schedule: _Schedule, json_out: bool) -> int:
    import asyncio

    def changed(plan: KeepalivePlan) -> None:
        schedule.apply(plan)
        _show_plan(plan, json_out)

    tuner = (asyncio.create_task(schedule.auto.measure(changed))
             if schedule.auto is not None and schedule.auto.wants_measurement else None)
    try:
        return await _register_forever(node, schedule, json_out)
    finally:
        if tuner is not None:
            tuner.cancel()
            await asyncio.gather(tuner, return_exceptions=True)


async def _register_forever(node: api.Registrant, schedule: _Schedule, json_out: bool) -> int:
    import asyncio

    from nattool.cli.output import emit_json, stdout

    known: dict[str, MemberEntry] = {}
    first = True
    while True:
        started = asyncio.get_running_loop().time()
        reg = await node.register(check=False)
        schedule.answered(reg)
        me = reg.me
        current = {m.endpoint.to_text(): m for m in reg.members}
        stamp = time.strftime("%H:%M:%S")
        if first and me is not None:
            if json_out:
                emit_json({"event": "registered", "group": reg.group, "self": _entry_json(me)})
            else:
                stdout.print(f"{stamp} registered in {reg.group} as {me.to_text()}")
            _show_plan(schedule.plan, json_out)
        elif me is None:
            if json_out:
                emit_json({"event": "unreachable", "errors": [str(r.error) for r in reg.replies]})
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
        await schedule.sleep_from(started)


__all__ = ["register"]
