"""Bounded memo tables for the hot paths: a value computed once per key, kept until
the table is full, then all of it dropped and filled again.

Emptying a full table costs nothing per entry and needs no bookkeeping per hit, the
price an LRU would charge on every request; what the hot paths remember (source
addresses, keepalive datagrams) repeats within seconds and is cheap to compute again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def bounded_memo(compute: Callable[[K], V | None], limit: int) -> tuple[dict[K, V], Callable[[K], V | None]]:
    """The table, for callers to read inline with ``table.get(key)``, and the function
    that computes a missing value and remembers it. None is returned, not
    remembered: it means "no value" (an input the computation declines)."""
    table: dict[K, V] = {}

    def learn(key: K) -> V | None:
        value = compute(key)
        if value is not None:
            if len(table) >= limit:
                table.clear()
            table[key] = value
        return value

    return table, learn


__all__ = ["bounded_memo"]
