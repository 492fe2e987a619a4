"""RFC 2782 ordering of SRV records: lowest priority first, weighted random inside one.

Pure: the random source is passed in, so tests can pin the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


class RandInt(Protocol):
    def randint(self, a: int, b: int) -> int: ...


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # absolute name without the trailing dot; "." (service not here) is ""

    @property
    def is_decline(self) -> bool:
        """Target "." : "the service is decidedly not available at this domain"."""
        return self.target == ""


def order_srv(records: Iterable[SrvRecord], rng: RandInt) -> list[SrvRecord]:
    """The order in which to contact the targets, per RFC 2782's selection algorithm.
    ``rng`` is the caller's random source (the protocol package draws none itself)."""
    by_priority: dict[int, list[SrvRecord]] = {}
    for record in records:
        by_priority.setdefault(record.priority, []).append(record)
    ordered: list[SrvRecord] = []
    for priority in sorted(by_priority):
        # Zero-weight records first, as the RFC says, so they get a small but real chance
        # (picked only when the random number is exactly 0). The rest of the sort key
        # makes the result independent of the order the DNS answer happened to use.
        pool = sorted(by_priority[priority], key=lambda r: (r.weight != 0, r.target, r.port, r.weight))
        while pool:
            total = sum(r.weight for r in pool)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(pool):
                running += record.weight
                if running >= pick:
                    ordered.append(pool.pop(index))
                    break
    return ordered
