"""Process exit codes, the same for every command."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # the command ran and the answer is "no" or an operation failed
    USAGE = 2  # bad flags, arguments or configuration
    TIMEOUT = 3  # no answer from any server in time
    UNREACHABLE = 4  # cannot resolve, bind or send
    STORE = 5  # the server's state store cannot be used
    INTERRUPTED = 130  # Ctrl-C
