"""Real NAT topologies on one machine: network namespaces, veth pairs, a bridge, nftables.

Topology (every box is a network namespace)::

    server host(s)  --veth--+
    (203.0.113.x,           |
     2001:db8:203::x)   "internet"  (router, no filtering)
                            |
    NAT router  <---veth----+   wan 198.51.100.N / 2001:db8:198::N
       | bridge "lan" 192.0.2.(32k+1)/27, 2001:db8:192:k::1/64
       +-- host(s) 192.0.2.(32k+10..29), 2001:db8:192:k::a..

Links to the "internet" are point-to-point (/32 and /128 host routes, gateway 203.0.113.1 /
198.51.100.1 / fe80::1), so all traffic between two namespaces crosses the internet
namespace and nothing short-circuits at layer 2 except hosts on the same LAN.

Namespace names are ``natlab-<pid>-<lab#>-<node>``: unique per process and lab, and a later
run deletes namespaces (and kills what runs in them) whose pid is dead.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

from .nft import Ipv6Mode, NatBehaviour, router_ruleset

if TYPE_CHECKING:
    import pexpect

PREFIX = "natlab"
NETNS_DIR = Path("/run/netns")
_STALE_RE = re.compile(rf"^{PREFIX}-(\d+)-")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")

SERVER_NET = ipaddress.IPv4Network("203.0.113.0/24")
WAN_NET = ipaddress.IPv4Network("198.51.100.0/24")
LAN_SUPERNET = ipaddress.IPv4Network("192.0.2.0/24")
LAN_PREFIXLEN = 27  # 8 LANs of 20 hosts each
DOC_NET6 = ipaddress.IPv6Network("2001:db8::/32")
SERVER_GW = "203.0.113.1"
WAN_GW = "198.51.100.1"
LINK_GW6 = "fe80::1"
WAN6_PREFIX = "2001:db8:198::"
LAN6_FORMAT = "2001:db8:192:{:x}::"
#: Where an inner router of a double NAT has its WAN: the outer router's LAN side gets
#: 100.64.<outer index>.1/24 (RFC 6598 shared address space, as a carrier-grade NAT uses).
CGN_SUPERNET = ipaddress.IPv4Network("100.64.0.0/10")
CGN_FORMAT = "100.64.{}.0/24"
DEFAULT_UDP_TIMEOUT = 120  # seconds, the kernel's "stream" UDP conntrack timeout


class LabError(RuntimeError):
    """Building or driving the lab failed (carries the failing command's stderr)."""


class LabUnavailable(LabError):
    """This machine cannot host the lab (not root, no ip/nft, no namespaces)."""


Addr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(eq=False)
class Node:
    """A namespace of the lab. ``ns`` is its name for ``ip netns``."""

    name: str
    ns: str
    lab: Lab = field(repr=False)


@dataclass(eq=False)
class Internet(Node):
    """The router between all WAN-side links. No filtering, no NAT."""


@dataclass(eq=False)
class ServerHost(Node):
    """A host on the public side with one or more addresses (e.g. an RFC 5780 server)."""

    addrs: tuple[str, ...] = ()

    @property
    def ipv4(self) -> list[str]:
        return [a for a in self.addrs if ":" not in a]

    @property
    def ipv6(self) -> list[str]:
        return [a for a in self.addrs if ":" in a]

    @property
    def ip(self) -> str:
        """The first address (IPv4 if it has one)."""
        return (self.ipv4 or self.ipv6)[0]


@dataclass(eq=False)
class Nat(Node):
    """A NAT router. ``wan_ip`` is the public (mapped) IPv4 address of its hosts."""

    behaviour: NatBehaviour = NatBehaviour.EIM_EIF
    ipv6: Ipv6Mode = Ipv6Mode.NONE
    index: int = 0
    wan_ip: str = ""
    wan_ip6: str | None = None
    lan: ipaddress.IPv4Network = LAN_SUPERNET
    lan6: ipaddress.IPv6Network | None = None
    udp_timeout: int = DEFAULT_UDP_TIMEOUT
    hairpin: bool = False
    hosts: list[Host] = field(default_factory=list, repr=False)
    #: The forward chain accepts DNATed new connections (a port-mapping gateway runs here).
    grants_mappings: bool = False
    #: The router whose LAN side this router's WAN is on (double NAT), None on the internet.
    upstream: Nat | None = field(default=None, repr=False)
    #: This router's default gateway (198.51.100.1, or the upstream router's 100.64.x.1).
    wan_gateway: str = WAN_GW
    #: Routers behind this one (their WANs on this router's LAN side, in 100.64.0.0/10).
    downstream: list[Nat] = field(default_factory=list, repr=False)

    @property
    def gateway(self) -> str:
        """The router's LAN address (the hosts' default gateway)."""
        return str(self.lan.network_address + 1)

    @property
    def gateway6(self) -> str | None:
        return None if self.lan6 is None else str(self.lan6.network_address + 1)


@dataclass(eq=False)
class Host(Node):
    """A host on a NAT router's LAN. ``ip6`` is None when the LAN has no IPv6."""

    nat: Nat | None = field(default=None, repr=False)
    ip: str = ""
    ip6: str | None = None


NodeRef = Union[Node, str]


# ---------------------------------------------------------------------------------------
# availability, stale sweep, process-wide cleanup


def _cmd(argv: Sequence[str], *, input: str | None = None, timeout: float = 20) -> str:
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        shown = f"\n--- input ---\n{input}" if input else ""
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}{shown}")
    return proc.stdout


_availability: str | None | bool = False  # False: not checked yet


def unavailable_reason() -> str | None:
    """Why this machine cannot run the lab, or None if it can (checked once, cached).

    Really creates a namespace with a veth pair and a NAT rule, so "available" means usable.
    """
    global _availability
    if _availability is not False:
        return _availability  # type: ignore[return-value]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "needs root (network namespaces, veth, nftables)"
    elif shutil.which("ip") is None:
        reason = "'ip' (iproute2) not found"
    elif shutil.which("nft") is None:
        reason = "'nft' (nftables) not found"
    else:
        ns = f"{PREFIX}-{os.getpid()}-probe"
        try:
            _cmd(["ip", "netns", "add", ns])
            try:
                _cmd(["ip", "-n", ns, "link", "add", "name", "p0", "type", "veth",
                      "peer", "name", "p1"])
                _cmd(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=(
                    "table inet probe {\n chain c {\n"
                    "  type nat hook postrouting priority srcnat;\n  masquerade random\n"
                    " }\n}\n"))
            finally:
                _cmd(["ip", "netns", "del", ns])
        except LabError as exc:
            reason = f"cannot build a namespace with veth and nftables NAT: {exc}"
    _availability = reason
    return reason


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed run can linger as a zombie until its parent reaps it
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _ns_pids(ns: str) -> list[int]:
    try:
        out = _cmd(["ip", "netns", "pids", ns], timeout=5)
    except LabError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_ns_processes(ns: str) -> None:
    for pid in _ns_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_namespaces(names: Sequence[str]) -> None:
    if not names:
        return
    # -force: keep going past a namespace that is already gone.
    subprocess.run(["ip", "-force", "-batch", "-"], input="".join(
        f"netns del {n}\n" for n in names), capture_output=True, text=True, timeout=30)


_swept = False


def sweep_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by processes that no longer exist; return their names."""
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    stale = []
    for name in entries:
        m = _STALE_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(name)
    for name in stale:
        _kill_ns_processes(name)
    _delete_namespaces(stale)
    return stale


_open_labs: set[Lab] = set()
_open_lock = threading.Lock()
_lab_counter = 0


@atexit.register
def _close_all_labs() -> None:
    with _open_lock:
        labs = list(_open_labs)
    for lab in labs:
        lab.close()


# ---------------------------------------------------------------------------------------


class Lab:
    """A set of namespaces forming one NAT topology; use as a context manager.

    All ``add_*`` calls take effect immediately (no separate build step). ``close()`` kills
    every process started through the lab and deletes every namespace; it is idempotent and
    also runs at interpreter exit.
    """

    def __init__(self) -> None:
        global _lab_counter
        with _open_lock:
            _lab_counter += 1
            self.id = _lab_counter
        self._prefix = f"{PREFIX}-{os.getpid()}-{self.id}"
        self._nodes: dict[str, Node] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._spawns: list[pexpect.spawn] = []
        self._cleanups: list[Callable[[], object]] = []
        self._servers = 0
        self._nats = 0
        self._used_addrs: set[Addr] = set()
        self._next_server_ip = 10
        self.internet: Internet | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Lab:
        """Check the machine, sweep stale namespaces once per process, create the internet."""
        global _swept
        if self._started:
            return self
        reason = unavailable_reason()
        if reason is not None:
            raise LabUnavailable(reason)
        if not _swept:
            _swept = True
            sweep_stale_namespaces()
        with _open_lock:
            _open_labs.add(self)
        self._started = True
        try:
            ns = self._new_namespace("internet", forward=True, forward6=True)
            self.internet = Internet("internet", ns, self)
            self._nodes["internet"] = self.internet
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill the lab's processes and delete its namespaces. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with _open_lock:
            _open_labs.discard(self)
        for callback in reversed(self._cleanups):
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - one failing cleanup must not stop the rest
                print(f"natlab: cleanup {callback!r} failed: {exc!r}", file=sys.stderr)
        for child in self._spawns:
            try:
                child.close(force=True)
            except Exception:  # noqa: BLE001 - cleanup must go on whatever pexpect raises
                pass
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        for p in live:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for p in self._procs:
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        # Grandchildren, or anything started with `ip netns exec` outside the lab's API.
        for ns in self._namespaces:
            _kill_ns_processes(ns)
        _delete_namespaces(self._namespaces)
        self._namespaces = []

    # -- building -------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not self._started or self._closed:
            raise LabError("lab is not running (use `with Lab() as lab:` or lab.start())")
        if not _NAME_RE.match(name):
            raise ValueError(f"node name {name!r}: use [a-z][a-z0-9_]*, at most 31 chars")
        if name in self._nodes:
            raise ValueError(f"node name {name!r} already used in this lab")

    def _new_namespace(self, name: str, *, forward: bool = False,
                       forward6: bool = False) -> str:
        ns = f"{self._prefix}-{name}"
        _cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        # Addresses must be usable at once: no DAD ("tentative" IPv6 addresses), no reverse
        # path filter inherited from the host. br_netfilter (if loaded) must not send
        # bridged LAN frames through the router's IP rules.
        settings = {
            "net/ipv6/conf/all/accept_dad": "0",
            "net/ipv6/conf/default/accept_dad": "0",
            "net/ipv4/conf/all/rp_filter": "0",
            "net/ipv4/conf/default/rp_filter": "0",
            "net/ipv4/ip_forward": "1" if forward else "0",
            "net/ipv6/conf/all/forwarding": "1" if forward6 else "0",
            "net/bridge/bridge-nf-call-iptables": "0",
            "net/bridge/bridge-nf-call-ip6tables": "0",
        }
        self._sysctl(ns, settings)
        self._ip(ns, ["link set lo up"])
        return ns

    def _sysctl(self, ns: str, settings: Mapping[str, str], script_tail: str = "",
                input: str | None = None) -> None:
        lines = [f"[ ! -e /proc/sys/{k} ] || echo {v} > /proc/sys/{k}"
                 for k, v in settings.items()]
        _cmd(["ip", "netns", "exec", ns, "sh", "-ec", "\n".join(lines) + "\n" + script_tail],
             input=input)

    def _ip(self, ns: str | None, commands: Sequence[str]) -> None:
        argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
        _cmd(argv, input="".join(c + "\n" for c in commands))

    def _claim(self, addr: str) -> Addr:
        a = ipaddress.ip_address(addr)
        if a in self._used_addrs:
            raise ValueError(f"address {addr} already used in this lab")
        self._used_addrs.add(a)
        return a

    def add_server_host(self, name: str, addrs: Sequence[str] | None = None) -> ServerHost:
        """A public host with ``addrs`` (default: one fresh 203.0.113.x).

        IPv4 addresses must lie in 203.0.113.0/24 (not .1), IPv6 ones in 2001:db8::/32
        (e.g. 2001:db8:203::10). Processes on it may bind any of its addresses.
        """
        self._check_name(name)
        if not addrs:
            while ipaddress.ip_address(f"203.0.113.{self._next_server_ip}") in self._used_addrs:
                self._next_server_ip += 1
            addrs = [f"203.0.113.{self._next_server_ip}"]
        parsed: list[Addr] = []
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if ip.version == 4 and (ip not in SERVER_NET or str(ip) == SERVER_GW
                                    or ip == SERVER_NET.broadcast_address
                                    or ip == SERVER_NET.network_address):
                raise ValueError(f"{a}: server IPv4 addresses must be in 203.0.113.2-254")
            if ip.version == 6 and (ip not in DOC_NET6 or str(ip).startswith(("2001:db8:198:",
                                                                              "2001:db8:192:"))):
                raise ValueError(f"{a}: server IPv6 addresses must be in 2001:db8::/32 "
                                 "outside 2001:db8:198::/48 and 2001:db8:192::/48")
            parsed.append(ip)
        for ip in parsed:
            self._claim(str(ip))
        self._servers += 1
        ns = self._new_namespace(name)
        ifname = f"s{self._servers}"
        assert self.internet is not None
        self._ip(None, [f"link add name {ifname} netns {self.internet.ns} type veth "
                        f"peer name eth0 netns {ns}"])
        self._ip(self.internet.ns, [
            f"address add {SERVER_GW}/32 dev {ifname}",
            f"address add {LINK_GW6}/64 dev {ifname} nodad",
            f"link set {ifname} up",
            *[f"route add {ip}/{ip.max_prefixlen} dev {ifname}" for ip in parsed],
        ])
        cmds = [f"address add {ip}/{ip.max_prefixlen} dev eth0"
                + (" nodad" if ip.version == 6 else "") for ip in parsed]
        cmds += ["link set eth0 up", f"route add default via {SERVER_GW} dev eth0 onlink"]
        if any(ip.version == 6 for ip in parsed):
            cmds.append(f"route add ::/0 via {LINK_GW6} dev eth0")
        self._ip(ns, cmds)
        node = ServerHost(name, ns, self, addrs=tuple(str(ip) for ip in parsed))
        self._nodes[name] = node
        return node

    def add_nat(self, name: str, behaviour: NatBehaviour = NatBehaviour.EIM_EIF, *,
                ipv6: Ipv6Mode | None = None, wan_ip: str | None = None,
                udp_timeout: int | None = None, hairpin: bool = False,
                grants_mappings: bool = False, behind: Nat | str | None = None) -> Nat:
        """A NAT router with an empty LAN; put hosts behind it with ``add_host``.

        ``ipv6`` defaults to FIREWALL for IPV6_FIREWALL and NONE otherwise (pass e.g.
        Ipv6Mode.FIREWALL with EIM_APDF for a typical dual-stack home router).
        ``udp_timeout`` (seconds) sets the router's UDP conntrack timeouts and the lifetime of
        its EIF/ADF state, i.e. how long an idle mapping lives (default 120, the kernel's).
        ``hairpin`` makes UDP from the LAN to one of the router's mappings loop back to the
        mapping's owner (with the sender's mapped address as source); off by default, as
        on Linux masquerade. Only for the NATing behaviours (EIM_*, APDM).
        ``grants_mappings`` makes the forward chain accept new connections a DNAT rule
        translated, so a port-mapping gateway (tests/natlab/portmap_lab.py) can work here.
        ``behind`` (a NATing router of this lab) puts this router's WAN on that router's LAN
        side instead of on the internet: a double NAT. Its WAN address is then in
        100.64.<behind's index>.0/24 (default .2, .3, ...) and IPv4 only.
        """
        self._check_name(name)
        if hairpin and behaviour in (NatBehaviour.NO_NAT, NatBehaviour.UDP_BLOCKED,
                                     NatBehaviour.IPV6_FIREWALL):
            raise ValueError(f"hairpin needs a NATing behaviour, not {behaviour.name}")
        if ipv6 is None:
            ipv6 = (Ipv6Mode.FIREWALL if behaviour is NatBehaviour.IPV6_FIREWALL
                    else Ipv6Mode.NONE)
        index = self._nats
        lans = list(LAN_SUPERNET.subnets(new_prefix=LAN_PREFIXLEN))
        if index >= len(lans):
            raise LabError(f"at most {len(lans)} NAT routers per lab")
        upstream: Nat | None = None
        if behind is not None:
            node = self.node(behind)
            if not isinstance(node, Nat) or node.behaviour in (
                    NatBehaviour.NO_NAT, NatBehaviour.IPV6_FIREWALL) or node.upstream:
                raise ValueError(f"{getattr(node, 'name', behind)!r}: a router can only be "
                                 "behind a NATing router that is itself on the internet")
            if ipv6 is not Ipv6Mode.NONE:
                raise ValueError("a router behind another router is IPv4 only")
            upstream = node
            cgn = ipaddress.IPv4Network(CGN_FORMAT.format(upstream.index))
            wan = wan_ip or str(cgn.network_address + 2 + len(upstream.downstream))
            if ipaddress.ip_address(wan) not in cgn or wan == str(cgn.network_address + 1):
                raise ValueError(f"{wan}: behind {upstream.name}, the WAN address must be "
                                 f"in {cgn} (not .0, .1)")
        else:
            wan = wan_ip or str(WAN_NET.network_address + 2 + index)
            wan_addr = ipaddress.ip_address(wan)
            if wan_addr not in WAN_NET or wan == WAN_GW:
                raise ValueError(f"{wan}: router WAN addresses must be in 198.51.100.2-254")
        self._claim(wan)
        self._nats += 1
        lan = lans[index]
        lan6 = (ipaddress.IPv6Network(LAN6_FORMAT.format(index) + "/64")
                if ipv6 is not Ipv6Mode.NONE else None)
        wan6 = f"{WAN6_PREFIX}{index + 2:x}" if ipv6 is not Ipv6Mode.NONE else None
        timeout = udp_timeout or DEFAULT_UDP_TIMEOUT
        ns = self._new_namespace(name, forward=True, forward6=ipv6 is not Ipv6Mode.NONE)
        ifname = f"r{index + 1}"
        assert self.internet is not None
        if upstream is None:
            wan_gateway, wan_cidr = WAN_GW, f"{wan}/32"
            self._link_to_internet(ifname, ns, wan, lan, lan6, wan6,
                                   routed=behaviour is NatBehaviour.NO_NAT)
        else:
            wan_gateway, wan_cidr = self._link_to_upstream(ifname, ns, wan, upstream)
        cmds = [
            f"address add {wan_cidr} dev wan",
            "link set wan up",
            f"route add default via {wan_gateway} dev wan onlink",
            "link add name lan type bridge stp_state 0 mcast_snooping 0",
            f"address add {lan.network_address + 1}/{lan.prefixlen} dev lan",
            "link set lan up",
        ]
        if lan6 is not None:
            cmds += [
                f"address add {wan6}/128 dev wan nodad",
                f"route add ::/0 via {LINK_GW6} dev wan",
                f"address add {lan6.network_address + 1}/64 dev lan nodad",
            ]
        self._ip(ns, cmds)
        tail = "nft -f -\n"
        if udp_timeout:
            tail += "".join(f"echo {udp_timeout} > /proc/sys/net/netfilter/{k}\n" for k in (
                "nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"))
        self._sysctl(ns, {}, tail, input=router_ruleset(behaviour, ipv6, timeout, wan_ip=wan,
                                                    lan=str(lan), hairpin=hairpin,
                                                    accept_dnat=grants_mappings))
        node = Nat(name, ns, self, behaviour=behaviour, ipv6=ipv6, index=index, wan_ip=wan,
                   wan_ip6=wan6, lan=lan, lan6=lan6, udp_timeout=timeout, hairpin=hairpin,
                   grants_mappings=grants_mappings, upstream=upstream,
                   wan_gateway=wan_gateway)
        if upstream is not None:
            upstream.downstream.append(node)
        self._nodes[name] = node
        return node

    def _link_to_internet(self, ifname: str, ns: str, wan: str, lan: ipaddress.IPv4Network,
                          lan6: ipaddress.IPv6Network | None, wan6: str | None, *,
                          routed: bool) -> None:
        """A router's ``wan`` as a point-to-point link to the internet namespace."""
        assert self.internet is not None
        self._ip(None, [f"link add name {ifname} netns {self.internet.ns} type veth "
                        f"peer name wan netns {ns}"])
        inet = [
            f"address add {WAN_GW}/32 dev {ifname}",
            f"address add {LINK_GW6}/64 dev {ifname} nodad",
            f"link set {ifname} up",
            f"route add {wan}/32 dev {ifname}",
        ]
        if routed:
            inet.append(f"route add {lan} via {wan} dev {ifname}")
        if lan6 is not None:
            inet += [f"route add {wan6}/128 dev {ifname}",
                     f"route add {lan6} via {wan6} dev {ifname}"]
        self._ip(self.internet.ns, inet)

    def _link_to_upstream(self, ifname: str, ns: str, wan: str,
                          upstream: Nat) -> tuple[str, str]:
        """A router's ``wan`` as a port of ``upstream``'s LAN bridge, in 100.64.x.0/24
        (the upstream's LAN side gets 100.64.x.1 with its first downstream router).
        Returns (default gateway, WAN address with prefix length) for the router's side."""
        cgn = ipaddress.IPv4Network(CGN_FORMAT.format(upstream.index))
        gateway = str(cgn.network_address + 1)
        cmds = [f"link set {ifname} master lan", f"link set {ifname} up"]
        if not upstream.downstream:
            cmds.append(f"address add {gateway}/{cgn.prefixlen} dev lan")
        self._ip(None, [f"link add name {ifname} netns {upstream.ns} type veth "
                        f"peer name wan netns {ns}"])
        self._ip(upstream.ns, cmds)
        return gateway, f"{wan}/{cgn.prefixlen}"

    def add_host(self, name: str, behind: Nat | str) -> Host:
        """A host on ``behind``'s LAN: next free 192.0.2.x (and IPv6 if the LAN has it)."""
        self._check_name(name)
        nat = self.node(behind) if isinstance(behind, str) else behind
        if not isinstance(nat, Nat):
            raise ValueError(f"{behind!r} is not a NAT router of this lab")
        n = len(nat.hosts)
        if n >= 20:
            raise LabError(f"at most 20 hosts behind {nat.name}")
        ip = str(nat.lan.network_address + 10 + n)
        ip6 = None if nat.lan6 is None else str(nat.lan6.network_address + 10 + n)
        self._claim(ip)
        ns = self._new_namespace(name)
        port = f"h{n + 1}"
        self._ip(None, [f"link add name {port} netns {nat.ns} type veth "
                        f"peer name eth0 netns {ns}"])
        self._ip(nat.ns, [f"link set {port} master lan", f"link set {port} up"])
        cmds = [
            f"address add {ip}/{nat.lan.prefixlen} dev eth0",
            "link set eth0 up",
            f"route add default via {nat.gateway} dev eth0",
        ]
        if ip6 is not None:
            cmds += [f"address add {ip6}/64 dev eth0 nodad",
                     f"route add ::/0 via {nat.gateway6} dev eth0"]
        self._ip(ns, cmds)
        node = Host(name, ns, self, nat=nat, ip=ip, ip6=ip6)
        nat.hosts.append(node)
        self._nodes[name] = node
        return node

    # -- using ----------------------------------------------------------------------------

    def node(self, ref: NodeRef) -> Node:
        """The node named ``ref`` (or ``ref`` itself if it is a node of this lab)."""
        if isinstance(ref, Node):
            if ref.lab is not self:
                raise ValueError(f"{ref.name} belongs to another lab")
            return ref
        try:
            return self._nodes[ref]
        except KeyError:
            raise ValueError(f"no node {ref!r} in this lab") from None

    @property
    def nodes(self) -> dict[str, Node]:
        return dict(self._nodes)

    def argv(self, node: NodeRef, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``node``'s namespace (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.node(node).ns, *argv]

    def run(self, node: NodeRef, argv: Sequence[str], *, check: bool = True,
            timeout: float = 30, input: str | None = None,
            env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion inside ``node``; capture text stdout/stderr.

        ``check`` raises CalledProcessError on a non-zero exit (stderr is in the exception);
        ``timeout`` kills the program and raises TimeoutExpired.
        """
        return subprocess.run(self.argv(node, argv), check=check, timeout=timeout,
                              input=input, capture_output=True, text=True,
                              env=None if env is None else dict(env), cwd=cwd)

    def popen(self, node: NodeRef, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``node``; kwargs go to subprocess.Popen unchanged.

        ``ip netns exec`` execs the program, so the Popen's pid is the program's own and
        terminate()/kill() reach it. The lab terminates it (then kills) on close().
        Read any stdout/stderr PIPE you ask for, or a chatty program blocks.
        """
        self._check_running()
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(node, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def spawn(self, node: NodeRef, argv: Sequence[str], **kwargs: Any) -> pexpect.spawn:
        """A ``pexpect.spawn`` of ``argv`` inside ``node`` (closed, forcibly, on close()).

        Defaults: ``encoding="utf-8"``, ``codec_errors="replace"``, ``timeout=10``,
        ``echo=False``; any pexpect.spawn keyword overrides them.
        """
        import pexpect  # only the tests that drive a terminal need it

        self._check_running()
        kwargs.setdefault("encoding", "utf-8")
        kwargs.setdefault("codec_errors", "replace")
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("echo", False)
        full = self.argv(node, argv)
        child = pexpect.spawn(full[0], full[1:], **kwargs)
        self._spawns.append(child)
        return child

    def start_service(self, node: NodeRef, argv: Sequence[str], *, ready: str | None = None,
                      timeout: float = 10.0, env: Mapping[str, str] | None = None,
                      cwd: str | os.PathLike[str] | None = None) -> Service:
        """Start a long-running program in ``node`` whose stdout+stderr is collected in the
        background (so it can never block on a full pipe) into ``Service.lines``.

        With ``ready``, return only once a line contains it; raise LabError with the output
        if the program exits or ``timeout`` passes first.
        """
        proc = self.popen(node, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=None if env is None else dict(env), cwd=cwd)
        svc = Service(proc, ready)
        if ready is not None and not (svc.ready.wait(timeout)
                                      and any(ready in line for line in svc.lines)):
            svc.stop()
            raise LabError(f"{' '.join(argv)}: no line containing {ready!r} within "
                           f"{timeout}s (exit {proc.poll()}); output:\n" + svc.output())
        return svc

    def add_cleanup(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on close(), last added first, before processes are killed."""
        self._check_running()
        self._cleanups.append(callback)

    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise LabError("lab is not running")

    def describe(self) -> str:
        """Addresses, routes and nft rulesets of every node: paste into a failure report."""
        parts = []
        for node in self._nodes.values():
            parts.append(f"=== {node.name} ({type(node).__name__}, ns {node.ns})")
            for argv in (["ip", "-br", "address"], ["ip", "route"], ["ip", "-6", "route"]):
                parts.append(subprocess.run(self.argv(node, argv), capture_output=True,
                                            text=True).stdout.rstrip())
            if isinstance(node, Nat):
                parts.append(subprocess.run(self.argv(node, ["nft", "list", "ruleset"]),
                                            capture_output=True, text=True).stdout.rstrip())
        return "\n".join(parts)


class Service:
    """A program started by :meth:`Lab.start_service`; its output lines in ``lines``."""

    def __init__(self, proc: subprocess.Popen[str], ready: str | None) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._needle = ready
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"natlab-service-{proc.pid}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if self._needle is not None and self._needle in line:
                    self.ready.set()
        except (ValueError, OSError):  # the lab closed the pipe under us at teardown
            pass
        self.ready.set()  # EOF: wake a waiter; it checks what it got

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (negative: signal)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        return self.proc.returncode


def wait_for_line(stream: IO[str], needle: str, timeout: float) -> str:
    """Read lines from a Popen'ed program's text pipe until one contains ``needle``; return
    it. Raises LabError (with the lines seen) on timeout or EOF. Uses :func:`read_line`."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        line = read_line(stream, max(0.0, deadline - time.monotonic()))
        if line is None:
            raise LabError(f"no line containing {needle!r} within {timeout}s; got:\n"
                           + "\n".join(seen[-40:]))
        if needle in line:
            return line
        seen.append(line)


def read_line(stream: IO[str], timeout: float) -> str | None:
    """One line from a text pipe within ``timeout`` s (None on timeout or EOF).

    For Popen'ed programs whose readiness shows in their output. Reads byte-wise under the
    hood, so do not mix with other reads of the same stream.
    """
    import selectors

    deadline = time.monotonic() + timeout
    buf = bytearray()
    fd = stream.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            b = os.read(fd, 1)
            if not b:
                return buf.decode(errors="replace") if buf else None
            if b == b"\n":
                return buf.decode(errors="replace")
            buf += b
