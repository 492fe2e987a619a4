"""nattool: a NAT tracker (rendezvous) server and the client toolkit around it.

The library API (all async; see :mod:`nattool.api` and :mod:`nattool.diag.connect`)::

    me = await nattool.whoami(["tracker.example.org"])            # -> WhoamiResult
    reg = await nattool.register("my-group", ["tracker.example.org"])  # -> Registration
    nat = await nattool.probe(["tracker.example.org"])            # -> ProbeResult
    peer = await nattool.connect("my-group", ["tracker.example.org"], ...)  # -> PeerConnection

Names are imported on first use, so that ``import nattool`` (which the command line
does on every run) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "whoami": "nattool.api",
    "register": "nattool.api",
    "probe": "nattool.api",
    "WhoamiResult": "nattool.api",
    "Sighting": "nattool.api",
    "Registration": "nattool.api",
    "TrackerRegistration": "nattool.api",
    "Registrant": "nattool.api",
    "ProbeResult": "nattool.diag.probe",
    "FamilyResult": "nattool.diag.probe",
    "connect": "nattool.diag.connect",
    "PeerConnection": "nattool.diag.connect",
    "Endpoint": "nattool.protocol.endpoint",
    "MemberEntry": "nattool.protocol.text",
    # the errors the functions raise, to catch by class
    "NattoolError": "nattool.errors",
    "UsageError": "nattool.errors",
    "NetworkError": "nattool.errors",
    "ResolveError": "nattool.errors",
    "NoAnswer": "nattool.errors",
    "TrackerRefused": "nattool.errors",
    "ProtocolError": "nattool.errors",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from nattool.api import (
        Registrant,
        Registration,
        Sighting,
        TrackerRegistration,
        WhoamiResult,
        probe,
        register,
        whoami,
    )
    from nattool.diag.connect import PeerConnection, connect
    from nattool.diag.probe import FamilyResult, ProbeResult
    from nattool.errors import (
        NattoolError,
        NetworkError,
        NoAnswer,
        ProtocolError,
        ResolveError,
        TrackerRefused,
        UsageError,
    )
    from nattool.protocol.endpoint import Endpoint
    from nattool.protocol.text import MemberEntry


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nattool' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
