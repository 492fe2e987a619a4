"""Ctrl-C must stop a client even when it lands just as a reply arrives.

On Python 3.11, asyncio.wait_for returns the inner result and drops a cancellation
that comes in the same loop turn as that result (CPython gh-86296): a
`register --keepalive` or `connect` then ran on after Ctrl-C. The client waits
with asyncio.timeout instead; this reproduces the race deterministically.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from nattool.net.client import UdpClient
from nattool.protocol.endpoint import Endpoint


def test_a_cancel_that_lands_with_the_reply_is_not_lost() -> None:
    async def main() -> None:
        client = await UdpClient.open(socket.AF_INET, "127.0.0.1")
        try:
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            # A closed loopback port: the request goes nowhere, only the queue answers.
            dest = Endpoint.from_text("127.0.0.1:9")
            task = asyncio.create_task(client._exchange(dest, b"//nat", bytes, queue, 5.0, 0))
            await asyncio.sleep(0.05)  # the exchange now waits on the queue
            queue.put_nowait(b"127.0.0.1:1")  # the reply...
            task.cancel()  # ...and Ctrl-C, in the same loop turn
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            client.close()

    asyncio.run(main())
