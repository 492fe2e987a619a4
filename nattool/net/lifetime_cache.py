"""The mapping lifetimes measured on each network this host was on, kept across runs.

`probe --lifetime` writes one entry per network, keyed by the local address and the
default gateway (a mapping's lifetime belongs to the router in front of that address);
`--keepalive auto` reads it. The file lives in the XDG cache directory
(``$XDG_CACHE_HOME/nattool/lifetimes.json``, else ``~/.cache/nattool/``): losing it costs
one measurement. Writes are atomic (a temporary file renamed over the old one), so a
reader never sees half a file; two writers at once may lose one's entry, never the file.

A file that is not ours is never fatal: a corrupt one (not JSON, wrong shape) is ignored
with a warning and replaced on the next write; one written by another version (another
``schema``) is ignored with a warning and left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from nattool.net.gateway import default_gateway
from nattool.net.localinfo import local_address_towards
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import TRACKER_TTL, KeepalivePlan, LifetimeBracket, auto_keepalive

SCHEMA = "nattool.lifetimes/1"
FILE_NAME = "lifetimes.json"
MAX_ENTRIES = 64  # networks remembered; the oldest measurement goes first
MAX_FILE_BYTES = 256 * 1024

Warn = Callable[[str], None]

log = logging.getLogger(__name__)


def cache_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where the cache lives: $XDG_CACHE_HOME/nattool (an absolute path, as the XDG spec
    wants; a relative one is ignored), else ~/.cache/nattool."""
    base = env.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path(env.get("HOME") or Path.home()) / ".cache"
    return root / "nattool" / FILE_NAME


def network_key(local: str, gateway: Optional[str]) -> str:
    return f"{local} via {gateway or 'none'}"


@dataclass(frozen=True, slots=True)
class CachedLifetime:
    local: str  # the local address the measurement was made from
    gateway: Optional[str]  # the default IPv4 gateway then (None: none)
    lifetime: LifetimeBracket
    measured_at: float  # wall-clock seconds (time.time())
    server: str  # the server that answered the measurement

    def age(self, wall_now: float) -> float:
        return wall_now - self.measured_at

    def to_json(self) -> dict[str, object]:
        return {
            "local": self.local,
            "gateway": self.gateway,
            "at_least_s": self.lifetime.at_least,
            "below_s": self.lifetime.below,
            "measured_at": self.measured_at,
            "server": self.server,
        }


class _Corrupt(Exception):
    pass


class _Foreign(Exception):
    pass


def _number(value: object, *, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Corrupt(f"bad number {value!r}")
    return float(value)


def _text(value: object, *, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise _Corrupt(f"bad text {str(value)[:40]!r}")
    return value


def _entry(raw: object) -> CachedLifetime:
    if not isinstance(raw, dict):
        raise _Corrupt("an entry is not an object")
    at_least = _number(raw.get("at_least_s"))
    below = _number(raw.get("below_s"), optional=True)
    assert at_least is not None
    if below is not None and below <= at_least:
        raise _Corrupt("an entry's bracket is empty")
    local = _text(raw.get("local"))
    assert local is not None
    measured_at = _number(raw.get("measured_at"))
    assert measured_at is not None
    return CachedLifetime(local, _text(raw.get("gateway"), optional=True), LifetimeBracket(at_least, below),
                          measured_at, _text(raw.get("server")) or "")


def _parse(data: bytes) -> dict[str, CachedLifetime]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Corrupt("not JSON") from None
    if not isinstance(doc, dict):
        raise _Corrupt("not a JSON object")
    if doc.get("schema") != SCHEMA:
        if "schema" in doc:
            raise _Foreign(f"schema {str(doc['schema'])[:40]!r}, not {SCHEMA!r}")
        raise _Corrupt("no schema")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise _Corrupt("no list of entries")
    out: dict[str, CachedLifetime] = {}
    for raw in entries:
        entry = _entry(raw)
        out[network_key(entry.local, entry.gateway)] = entry
    return out


class LifetimeCache:
    """The cache file at ``path`` (default: :func:`cache_path`). ``warn`` hears about a
    file that is ignored or cannot be written (default: this module's logger)."""

    def __init__(self, path: Optional[Path] = None, warn: Optional[Warn] = None) -> None:
        self.path = path if path is not None else cache_path()
        self.warn: Warn = warn if warn is not None else log.warning

    def _load(self) -> tuple[dict[str, CachedLifetime], bool]:
        """The entries, and whether the file may be replaced (False: another version's)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            return {}, True
        except OSError as exc:
            self.warn(f"cannot read the lifetime cache {self.path}: {exc.strerror or exc}")
            return {}, False
        try:
            if len(data) > MAX_FILE_BYTES:
                raise _Corrupt(f"larger than {MAX_FILE_BYTES} bytes")
            return _parse(data), True
        except _Foreign as exc:
            self.warn(f"ignoring the lifetime cache {self.path}: written by another version ({exc})")
            return {}, False
        except _Corrupt as exc:
            self.warn(f"ignoring the lifetime cache {self.path}: corrupt ({exc})")
            return {}, True

    def lookup(self, local: str, gateway: Optional[str]) -> Optional[CachedLifetime]:
        """The measurement for this network, or None."""
        entries, _ = self._load()
        return entries.get(network_key(local, gateway))

    def remember(self, entry: CachedLifetime) -> bool:
        """Store ``entry`` (replacing this network's older one); False when the file
        could not be written (the reason went to ``warn``)."""
        entries, writable = self._load()
        if not writable:
            return False
        entries[network_key(entry.local, entry.gateway)] = entry
        kept = sorted(entries.values(), key=lambda e: e.measured_at)[-MAX_ENTRIES:]
        doc = {"schema": SCHEMA, "entries": [e.to_json() for e in kept]}
        try:
            self._write_atomically(json.dumps(doc, indent=1).encode() + b"\n")
        except OSError as exc:
            self.warn(f"cannot write the lifetime cache {self.path}: {exc.strerror or exc}")
            return False
        return True

    def _write_atomically(self, data: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise




def network_toward(dest: Endpoint) -> Optional[tuple[str, Optional[str]]]:
    """This host's network as the cache keys it, seen toward ``dest``: the local
    address the kernel would send from, and the default IPv4 gateway. None for IPv6
    destinations (the gateway key is IPv4's) and when no local address can be found."""
    if dest.ip.version != 4:
        return None
    local = local_address_towards(dest)
    if local is None:
        return None
    gateway = default_gateway()
    return local, str(gateway.ip) if gateway is not None else None


def auto_plan(trackers: Sequence[Endpoint], wall_now: float, *, cache: Optional[LifetimeCache] = None,
              tracker_ttl: float = TRACKER_TTL) -> KeepalivePlan:
    """`--keepalive auto` for a client of ``trackers``: from the cached lifetime of the
    network toward the first IPv4 tracker, else the safe default."""
    cache = cache if cache is not None else LifetimeCache()
    for tracker in trackers:
        network = network_toward(tracker)
        if network is None:
            continue
        entry = cache.lookup(*network)
        if entry is not None:
            return auto_keepalive(entry.lifetime, entry.age(wall_now), tracker_ttl=tracker_ttl)
        break
    return auto_keepalive(None, None, tracker_ttl=tracker_ttl)


__all__ = ["SCHEMA", "CachedLifetime", "LifetimeCache", "auto_plan", "cache_path", "network_key", "network_toward"]
