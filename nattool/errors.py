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

