"""The shell of bounded coalescing (:mod:`nattool.tracker.coalesce` decides): a socket
reader that, after its drain, sleeps as long as the decision says.

The sleep blocks the event loop, on purpose: an asyncio or uvloop timer cannot wait
less than a millisecond (epoll's timeout is in milliseconds), and returning to the
loop to wait costs the very wake-up the wait saves. It is bounded by
``--coalesce-us``, and the loop gets its turn after every drain, so timers
(housekeeping, federation), the other sockets and the store's flushes wait at most
that long.

The sleep keeps the GIL. Released (``time.sleep``), it went to the SQLite log's
checkpoint thread, which runs at idle priority: on a busy machine that thread then
waited for a CPU while holding the GIL, and the loop waited for it, for
milliseconds (registrations at 50,000/s: median latency 4.6 ms instead of 0.2).
The metrics endpoint's thread waits at most one sleep for it.
"""

from __future__ import annotations

import ctypes
import sys
import time
from typing import Any, Callable, Optional

from nattool.tracker.coalesce import Coalescer

# Linux lets a sleep end up to 50 us late by default (the thread's timer slack),
# which would be a quarter of the default bound. A microsecond is what the wait needs.
TIMER_SLACK_NS = 1000
_PR_SET_TIMERSLACK = 29


def fine_timer_slack() -> bool:
    """Make this thread's sleeps end on time (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) == 0)
    except (OSError, AttributeError, TypeError):
        return False


def _sleep_keeping_the_gil() -> Callable[[float], Any]:
    """``sleep(seconds)`` that does not release the GIL (libc's usleep called through
    ``ctypes.PyDLL``), or ``time.sleep`` where there is no such libc function."""
    try:
        usleep = ctypes.PyDLL(None).usleep
    except (OSError, AttributeError, TypeError):  # no C library to load by that name
        return time.sleep
    usleep.argtypes = [ctypes.c_uint]
    usleep.restype = ctypes.c_int
    return lambda seconds: usleep(int(seconds * 1e6))


def coalesced(
    drain: Callable[[Any], Optional[int]], coalescer: Coalescer, urgent: Callable[[], bool]
) -> Callable[[Any], None]:
    """A reader callback: ``drain(listener)`` (which returns how many datagrams it read,
    or None when it does not count), then the wait the coalescer decides; none while
    ``urgent()`` says the loop has work due at once."""
    after_drain = coalescer.after_drain
    slept = coalescer.slept
    clock = time.monotonic
    sleep = _sleep_keeping_the_gil()

    def reader(listener: Any) -> None:
        began = clock()
        wait = after_drain(drain(listener), began, listener, urgent())
        if wait:
            start = clock()
            sleep(wait)
            end = clock()
            slept(wait, end - start, end)

    return reader
