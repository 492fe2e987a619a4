"""Standard STUN software in the lab: coturn's turnserver, turnutils_stunclient, and a
hand-built STUN Binding request (no nattool code) to check that a server answers.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .lab import Lab, LabError, NodeRef

# Sends a 20-byte Binding request (type 0x0001, length 0, magic cookie 0x2112A442, 12 random
# bytes of transaction id; optionally CHANGE-REQUEST) every `interval` s until a response with
# the same transaction id arrives or `deadline` passes; prints the decoded addresses as JSON.
STUN_CLIENT_SOURCE = r'''
import json, os, select, socket, struct, sys, time
a = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in a["server"][0] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((a["local"][0] or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), a["local"][1]))
tid = os.urandom(12)
attrs = b""
if a["change"]:
    attrs = struct.pack("!HHI", 0x0003, 4, a["change"])
req = struct.pack("!HHI", 0x0001, len(attrs), 0x2112A442) + tid + attrs
dst = (a["server"][0], a["server"][1])
deadline = time.monotonic() + a["timeout"]
res = {"timeout": True}
while time.monotonic() < deadline:
    s.sendto(req, dst)
    step = min(a["interval"], deadline - time.monotonic())
    end = time.monotonic() + step
    while (left := end - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        data, src = s.recvfrom(2048)
        if len(data) < 20 or data[8:20] != tid:
            continue
        mtype, mlen, cookie = struct.unpack("!HHI", data[:8])
        res = {"type": mtype, "from": [src[0], src[1]], "local": list(s.getsockname()[:2])}
        names = {0x0001: "mapped", 0x0020: "xor_mapped", 0x802C: "other",
                 0x802B: "origin", 0x0005: "changed"}
        i = 20
        while i + 4 <= 20 + mlen:
            at, al = struct.unpack("!HH", data[i:i + 4])
            v = data[i + 4:i + 4 + al]
            if at in names and len(v) >= 8:
                port = struct.unpack("!H", v[2:4])[0]
                raw = v[4:8] if v[1] == 1 else v[4:20]
                if at == 0x0020:
                    port ^= 0x2112
                    key = struct.pack("!I", 0x2112A442) + (tid if v[1] == 2 else b"")
                    raw = bytes(x ^ y for x, y in zip(raw, key))
                ip = socket.inet_ntop(socket.AF_INET if v[1] == 1 else socket.AF_INET6, raw)
                res[names[at]] = [ip, port]
            elif at == 0x8022:
                res["software"] = v.decode(errors="replace")
            elif at == 0x0009 and len(v) >= 4:
                res["error"] = v[2] * 100 + v[3]
            i += 4 + al + (-al % 4)
        break
    if "type" in res:
        break
print(json.dumps(res))
'''


@dataclass(frozen=True)
class StunReply:
    """A decoded STUN response. Endpoints are (ip, port); None where the attribute is absent."""

    type: int
    src: tuple[str, int]  # where the response came from
    local: tuple[str, int]  # the client socket
    xor_mapped: tuple[str, int] | None
    mapped: tuple[str, int] | None
    other: tuple[str, int] | None  # OTHER-ADDRESS (RFC 5780)
    origin: tuple[str, int] | None  # RESPONSE-ORIGIN
    changed: tuple[str, int] | None  # CHANGED-ADDRESS (RFC 3489)
    software: str | None
    error: int | None

    @property
    def is_success(self) -> bool:
        return self.type == 0x0101


def _ep(v: Any) -> tuple[str, int] | None:
    return None if v is None else (str(v[0]), int(v[1]))


def stun_binding(lab: Lab, node: NodeRef, server: tuple[str, int], *, timeout: float = 2.0,
                 interval: float = 0.2, local: tuple[str, int] = ("", 0),
                 change: int = 0) -> StunReply | None:
    """Send a hand-built STUN Binding request from ``node``; the decoded reply or None.

    Retransmits every ``interval`` s until ``timeout``. ``change`` is the CHANGE-REQUEST
    flags (0x4 change IP, 0x2 change port; 0 = attribute absent). No nattool code involved.
    """
    arg = {"server": [str(ipaddress.ip_address(server[0])), server[1]], "timeout": timeout,
           "interval": interval, "local": list(local), "change": change}
    out = lab.run(node, [sys.executable, "-c", STUN_CLIENT_SOURCE, json.dumps(arg)],
                  timeout=timeout + 10).stdout
    res = json.loads(out)
    if res.get("timeout"):
        return None
    return StunReply(type=res["type"], src=_ep(res["from"]), local=_ep(res["local"]),  # type: ignore[arg-type]
                     xor_mapped=_ep(res.get("xor_mapped")), mapped=_ep(res.get("mapped")),
                     other=_ep(res.get("other")), origin=_ep(res.get("origin")),
                     changed=_ep(res.get("changed")), software=res.get("software"),
                     error=res.get("error"))


@dataclass
class TurnServer:
    """A running coturn ``turnserver`` (STUN only) inside the lab. Stopped with the lab."""

    proc: subprocess.Popen[str]
    ips: tuple[str, ...]
    port: int
    alt_port: int
    config: Path
    log: list[str] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> tuple[str, int]:
        """The primary ip:port."""
        return (self.ips[0], self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def turnserver_available() -> str | None:
    """Why coturn cannot be used here, or None."""
    if shutil.which("turnserver") is None:
        return "coturn's 'turnserver' not found (Debian package coturn)"
    return None


def start_turnserver(lab: Lab, host: NodeRef, ips: list[str] | tuple[str, ...],
                     port: int = 3478, *, alt_port: int | None = None,
                     ready_timeout: float = 10.0,
                     extra_config: tuple[str, ...] = (),
                     turn_users: tuple[str, ...] = (), realm: str = "natlab") -> TurnServer:
    """Run coturn's turnserver in STUN-only mode on ``host``, listening on ``ips``.

    With ``turn_users`` ("NAME:PASSWORD" each) it is a TURN server too, with long-term
    credentials in ``realm`` (coturn's lt-cred-mech), over UDP and TCP; relayed addresses
    on the listening IPs.

    Two ``ips`` (two ``listening-ip`` lines) make it an RFC 5780 server (OTHER-ADDRESS,
    CHANGE-REQUEST) with the alternate port ``alt_port`` (default port+1); with one IP it is a
    plain RFC 8489 server. Returns once every ip:port answers a Binding request from
    ``host`` itself; raises LabError (with coturn's log) if it does not within
    ``ready_timeout``. The log (coturn writes it to stdout) is collected in ``.log``.
    """
    reason = turnserver_available()
    if reason:
        raise LabError(reason)
    alt = port + 1 if alt_port is None else alt_port
    tmp = tempfile.TemporaryDirectory(prefix="natlab-coturn-")
    conf = Path(tmp.name) / "turnserver.conf"
    lines = [f"listening-ip={ip}" for ip in ips] + [
        f"listening-port={port}",
        f"alt-listening-port={alt}",
        *(["lt-cred-mech", f"realm={realm}", *(f"user={u}" for u in turn_users)] if turn_users
          else ["stun-only"]),  # no TURN, no auth
        "no-cli",
        "no-tls",
        "no-dtls",
        "fingerprint",
        "log-file=stdout",
        "simple-log",
        f"pidfile={tmp.name}/turnserver.pid",
        f"userdb={tmp.name}/turndb",
        *extra_config,
    ]
    conf.write_text("\n".join(lines) + "\n")
    proc = lab.popen(host, ["turnserver", "-c", str(conf)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     errors="replace")
    server = TurnServer(proc, tuple(ips), port, alt, conf, _tmp=tmp)
    lab.add_cleanup(server.stop)

    def drain() -> None:  # a full pipe would block coturn
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                server.log.append(line.rstrip("\n"))
        except (ValueError, OSError):  # the lab closed the pipe under us at teardown
            pass

    threading.Thread(target=drain, name="turnserver-log", daemon=True).start()
    for ip in ips:
        reply = stun_binding(lab, host, (ip, port), timeout=ready_timeout, interval=0.1)
        if reply is None or not reply.is_success:
            server.stop()
            tail = "\n".join(server.log[-30:])
            raise LabError(f"turnserver on {ip}:{port} did not answer within "
                           f"{ready_timeout}s (exit {proc.poll()}); log:\n{tail}")
    return server


def run_stunclient(lab: Lab, node: NodeRef, server_ip: str, port: int = 3478, *,
                   timeout: float = 5.0,
                   extra_args: tuple[str, ...] = (),
                   until: Callable[[str], bool] | None = None) -> tuple[int | None, str]:
    """Run coturn's ``turnutils_stunclient`` in ``node``; (exit status or None, output).

    Always bounded by ``timeout``: behind a NAT, against an RFC 5780 server, the client's
    second test waits on another local port for an answer the NAT never lets in, and it
    never exits. A None status means it was killed at the timeout (or, with ``until``, once
    its output said enough); its output so far is kept.
    """
    if shutil.which("turnutils_stunclient") is None:
        raise LabError("coturn's 'turnutils_stunclient' not found (Debian package coturn)")
    proc = lab.popen(node, ["turnutils_stunclient", "-p", str(port), *extra_args, server_ip],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, errors="replace")
    return communicate_bounded(proc, timeout, until=until)


def communicate_bounded(proc: "subprocess.Popen[str]", timeout: float, *,
                        until: Callable[[str], bool] | None = None) -> tuple[int | None, str]:
    """Wait for ``proc`` at most ``timeout`` seconds, killing it then; returns its exit
    status (None when killed) and its output so far.

    ``until(output so far)``, checked at each line, ends the wait early: the process is
    killed as soon as it is true (a client that never exits has printed what we need)."""
    if until is None:
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            return None, out
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not done.is_set() and until("".join(lines)):
                done.set()
        done.set()  # end of output: it exited (or was killed)

    reader = threading.Thread(target=read, name="communicate-bounded", daemon=True)
    reader.start()
    done.wait(timeout)
    killed = proc.poll() is None
    if killed:
        proc.kill()
    proc.wait()
    reader.join()
    return (None if killed else proc.returncode), "".join(lines)
