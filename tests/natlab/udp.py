"""A tiny UDP agent that runs inside a namespace and is driven from the test process.

One agent process per node holds any number of UDP sockets; the test asks it to bind, send,
receive, or to "ask" a reflector what source address it saw. A socket bound with
``reflect=True`` answers every datagram with ``MAPPED <ip> <port>`` (the source it saw),
which is the "what is my address" server of the self-tests. Plain Python, no nattool code.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .lab import LabError, read_line

if TYPE_CHECKING:
    from .lab import Lab, NodeRef

AGENT_SOURCE = r'''
import json, os, select, socket, sys, time
socks, queues, reflect, ids = {}, {}, set(), {}
def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
def drain(sid):
    s = socks[sid]
    while True:
        try:
            data, addr = s.recvfrom(65535)
        except OSError:
            return
        src = [addr[0], addr[1]]
        if sid in reflect:
            s.sendto(("MAPPED %s %d" % (src[0], src[1])).encode(), addr)
        if len(queues[sid]) < 10000:
            queues[sid].append((data, src))
def pump(timeout):
    r = select.select(list(socks.values()), [], [], max(0.0, timeout))[0] if socks else []
    if not socks:
        time.sleep(max(0.0, timeout))
    for s in r:
        drain(ids[s])
def wait_for(sid, pred, deadline):
    while True:
        q = queues[sid]
        for i, (d, a) in enumerate(q):
            if pred(d, a):
                del q[i]
                return d, a
        now = time.monotonic()
        if now >= deadline:
            return None
        pump(deadline - now)
def handle(c):
    op = c["op"]
    if op == "bind":
        fam = socket.AF_INET6 if ":" in c["ip"] else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((c["ip"], c["port"]))
        s.setblocking(False)
        sid = len(ids) + 1
        socks[sid], queues[sid], ids[s] = s, [], sid
        if c.get("reflect"):
            reflect.add(sid)
        a = s.getsockname()
        return {"sock": sid, "addr": [a[0], a[1]]}
    sid = c["sock"]
    if op == "send":
        socks[sid].sendto(bytes.fromhex(c["data"]), tuple(c["to"]))
        return {}
    if op == "recv":
        frm = c.get("from")
        got = wait_for(sid, lambda d, a: frm is None or a == frm,
                       time.monotonic() + c["timeout"])
        return {"data": got[0].hex(), "from": got[1]} if got else {"timeout": True}
    if op == "ask":
        to = c["to"]
        for _ in range(c["tries"]):
            socks[sid].sendto(b"WHOAMI", tuple(to))
            got = wait_for(sid, lambda d, a: a == to and d.startswith(b"MAPPED "),
                           time.monotonic() + c["timeout"])
            if got:
                _, ip, port = got[0].decode().split()
                return {"mapped": [ip, int(port)]}
        return {"timeout": True}
    if op == "close":
        s = socks.pop(sid); del ids[s]; queues.pop(sid); reflect.discard(sid); s.close()
        return {}
    raise ValueError("unknown op %r" % op)
out({"ready": True})
buf = b""
while True:
    r = select.select([0] + list(socks.values()), [], [])[0]
    for s in r:
        if s != 0:
            drain(ids[s])
    if 0 in r:
        chunk = os.read(0, 65536)
        if not chunk:
            sys.exit(0)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                res = handle(json.loads(line))
                res["ok"] = True
            except Exception as e:
                res = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
            out(res)
'''


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Datagram:
    data: bytes
    src: Endpoint


class AgentError(LabError):
    """The agent refused a command (bind/send failed, e.g. network unreachable)."""


class UdpAgent:
    """Drives one agent process inside ``node``. Created by :func:`udp_agent`."""

    def __init__(self, lab: Lab, node: NodeRef) -> None:
        self.node = lab.node(node)
        self._proc = lab.popen(self.node, [sys.executable, "-c", AGENT_SOURCE],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, bufsize=1)
        first = self._readline(10.0)
        if json.loads(first).get("ready") is not True:
            raise LabError(f"udp agent on {self.node.name} did not start: {first!r}")

    def _readline(self, timeout: float) -> str:
        assert self._proc.stdout is not None
        line = read_line(self._proc.stdout, timeout)
        if line is None:
            self._proc.kill()
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise LabError(f"udp agent on {self.node.name} is not answering: {err}")
        return line

    def call(self, op: str, args: dict[str, Any], wait: float = 0.0) -> dict[str, Any]:
        """Send one command; ``wait`` is how long the agent may legitimately take."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        res: dict[str, Any] = json.loads(self._readline(wait + 10.0))
        if not res.pop("ok"):
            raise AgentError(f"{self.node.name}: {op} {args}: {res['error']}")
        return res

    def bind(self, ip: str = "0.0.0.0", port: int = 0, *, reflect: bool = False) -> UdpSocket:
        """A UDP socket bound to ip:port (``"::"`` for IPv6; port 0 = any)."""
        res = self.call("bind", {"ip": ip, "port": port, "reflect": reflect})
        return UdpSocket(self, res["sock"], (res["addr"][0], res["addr"][1]))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()


@dataclass(frozen=True)
class UdpSocket:
    agent: UdpAgent
    id: int
    addr: Endpoint  # local address as bound

    @property
    def port(self) -> int:
        return self.addr[1]

    def send(self, to: Endpoint, data: bytes | str = b"x") -> None:
        payload = data.encode() if isinstance(data, str) else data
        self.agent.call("send", {"sock": self.id, "to": [_norm(to[0]), to[1]],
                                "data": payload.hex()})

    def recv(self, timeout: float = 1.0, *, src: Endpoint | None = None) -> Datagram | None:
        """The next datagram (from ``src`` only, if given) within ``timeout``, else None."""
        frm = None if src is None else [_norm(src[0]), src[1]]
        res = self.agent.call("recv", {"sock": self.id, "timeout": timeout, "from": frm},
                              wait=timeout)
        if res.get("timeout"):
            return None
        return Datagram(bytes.fromhex(res["data"]), (res["from"][0], res["from"][1]))

    def recv_all(self, duration: float) -> list[Datagram]:
        """Every datagram arriving within ``duration`` seconds."""
        got = []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            d = self.recv(left)
            if d is None:
                break
            got.append(d)
        return got

    def ask(self, reflector: Endpoint, *, timeout: float = 0.5, tries: int = 4) -> Endpoint | None:
        """Our address as a reflector at ``reflector`` sees it (None: no answer)."""
        res = self.agent.call("ask", {"sock": self.id, "to": [_norm(reflector[0]), reflector[1]],
                                      "timeout": timeout, "tries": tries}, wait=timeout * tries)
        if res.get("timeout"):
            return None
        return (res["mapped"][0], res["mapped"][1])

    def close(self) -> None:
        self.agent.call("close", {"sock": self.id})


def udp_agent(lab: Lab, node: NodeRef) -> UdpAgent:
    """Start a UDP agent inside ``node`` (stopped with the lab, or by ``agent.close()``)."""
    return UdpAgent(lab, node)
