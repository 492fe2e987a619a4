"""The one error hierarchy of nattool.

Every error that nattool raises on purpose derives from :class:`NattoolError`.
The CLI turns it into a one-line message and an exit code; anything else that
escapes is a bug.
"""

from __future__ import annotations

from nattool.exit_codes import ExitCode


class NattoolError(Exception):
    """Base of every error nattool raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class ProtocolError(NattoolError):
    """Bytes that are not a valid message of the protocol being parsed."""


class LimitError(NattoolError):
    """A request that would exceed a resource cap (members, groups, memory)."""


class UsageError(NattoolError):
    """Bad input given by a user on the command line or in configuration."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A configuration file or environment variable that cannot be used."""


class NetworkError(NattoolError):
    """A socket-level failure: cannot bind, send, or resolve."""

    exit_code = ExitCode.UNREACHABLE


class ResolveError(NetworkError):
    """A host name that does not resolve, or DNS that does not answer."""


class NoAnswer(NetworkError):
    """No answer within the allotted time and retries."""

    exit_code = ExitCode.TIMEOUT


class TrackerRefused(NattoolError):
    """A tracker answered, and the answer is no (an ``ERR`` reply)."""


class StoreError(NattoolError):
    """The state store failed (unreachable, corrupt, too slow)."""

    exit_code = ExitCode.STORE


class StoreLocked(StoreError):
    """The store's file is held by another process: another server, an sqlite3 shell."""



class PortmapProtocolError(ProtocolError):
    """Bytes that are not a valid PCP, NAT-PMP or UPnP IGD message.

    ``result`` is the result code a PCP server answers such a request with
    (MALFORMED_REQUEST = 3 unless the fault is an option's: MALFORMED_OPTION = 6,
    UNSUPP_OPTION = 5).
    """

    def __init__(self, message: str, *, result: int = 3) -> None:
        super().__init__(message)
        self.result = result


class PortmapError(NattoolError):
    """Port mapping at the gateway failed or is not available."""


class PortmapRefused(PortmapError):
    """A port-mapping gateway answered, and the answer is no (a result code or a fault)."""

    def __init__(self, message: str, *, protocol: str = "", code: int = 0) -> None:
        super().__init__(message)
        self.protocol = protocol  # "pcp" | "natpmp" | "upnp"
        self.code = code  # the protocol's result code (UPnP: the UPnPError code)


class PortmapUnavailable(PortmapError):
    """No port-mapping protocol answered at the gateway (or there is no gateway)."""

    exit_code = ExitCode.UNREACHABLE
