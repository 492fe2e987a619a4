"""The one place that picks the event loop: uvloop where it is installed (about four
times the datagram rate of plain asyncio), plain asyncio elsewhere (Windows)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], *, fast: bool = True) -> T:
    if fast:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    if sys.platform == "win32":
        # The server reads its sockets with loop.add_reader, which Windows' default
        # proactor loop lacks; the selector loop has it.
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            return runner.run(main)
    return asyncio.run(main)
