"""When a client sends a request again: the one schedule every nattool transaction uses."""

from __future__ import annotations


def backoff_schedule(timeout: float, retries: int) -> list[float]:
    """Waits after each send: doubling, summing to ``timeout`` (1 + retries sends)."""
    sends = retries + 1
    first = timeout / (2**sends - 1)
    return [first * 2**i for i in range(sends)]


__all__ = ["backoff_schedule"]
