"""A small HDR-style latency histogram: log-bucketed, fixed memory, mergeable.

Values are non-negative integers (the bench records nanoseconds). Values below
``2 << bits`` get a bucket each; above that every power of two is split into
``1 << bits`` equal buckets, so a bucket is never wider than ``1 / (1 << bits)`` of
its lower bound. A percentile is reported as the midpoint of its bucket, so its
relative error is at most ``1 / (2 << bits)`` (0.39 % with the default 7 bits).
Memory is fixed by ``bits`` and ``max_value``; values above ``max_value`` land in
the last bucket (min and max are still kept exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

DEFAULT_BITS = 7
DEFAULT_MAX = 1 << 40  # ns: about 18 minutes, far beyond any timeout


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    min: int
    p50: int
    p90: int
    p99: int
    p999: int
    max: int
    mean: float


class Histogram:
    """Counts of values in log-linear buckets."""

    __slots__ = ("bits", "max_value", "counts", "count", "total", "min", "max", "_exact", "_sub")

    def __init__(self, bits: int = DEFAULT_BITS, max_value: int = DEFAULT_MAX) -> None:
        if not 1 <= bits <= 16:
            raise ValueError("bits must be 1..16")
        if max_value < (2 << bits):
            raise ValueError("max_value too small for bits")
        self.bits = bits
        self.max_value = max_value
        self._sub = 1 << bits
        self._exact = 2 << bits  # values below this have a bucket of their own
        self.counts = [0] * (self.index(max_value) + 1)
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    # -- bucket arithmetic -----------------------------------------------------
    def index(self, value: int) -> int:
        if value < self._exact:
            return value
        shift = value.bit_length() - self.bits - 1
        return (shift << self.bits) + (value >> shift)

    def bucket_bounds(self, index: int) -> tuple[int, int]:
        """[low, high) of the values that land in bucket ``index``."""
        if index < self._exact:
            return index, index + 1
        shift = (index >> self.bits) - 1
        low = (index - (shift << self.bits)) << shift
        return low, low + (1 << shift)

    @property
    def relative_error(self) -> float:
        """Bound on |reported - true| / true for any percentile."""
        return 1.0 / (2 * self._sub)

    # -- recording -------------------------------------------------------------
    def record(self, value: int, n: int = 1) -> None:
        if value < 0:
            value = 0
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += n
        self.total += value * n
        if value > self.max_value:
            value = self.max_value
        self.counts[self.index(value)] += n

    def merge(self, other: "Histogram") -> None:
        if other.bits != self.bits or other.max_value != self.max_value:
            raise ValueError("cannot merge histograms of different shapes")
        if other.count == 0:
            return
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    # -- queries ---------------------------------------------------------------
    def percentile(self, q: float) -> int:
        """The value at quantile ``q`` in percent (0..100): the midpoint of the bucket
        that holds the ceil(q% * count)-th smallest value, clamped to [min, max]."""
        if self.count == 0:
            return 0
        rank = max(1, -(-int(q * self.count * 1000) // 100_000))  # ceil without float drift
        if rank >= self.count:
            return self.max  # kept exactly, even above max_value
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    low, high = self.bucket_bounds(i)
                    mid = low + (high - low - 1) // 2 if high - low > 1 else low
                    return min(max(mid, self.min), self.max)
        return self.max

    def summary(self) -> Summary:
        return Summary(
            count=self.count,
            min=self.min,
            p50=self.percentile(50),
            p90=self.percentile(90),
            p99=self.percentile(99),
            p999=self.percentile(99.9),
            max=self.max,
            mean=self.total / self.count if self.count else 0.0,
        )

    def copy(self) -> "Histogram":
        out = Histogram(self.bits, self.max_value)
        out.merge(self)
        return out

    def minus(self, earlier: "Histogram") -> "Histogram":
        """Values recorded since ``earlier`` (a copy of this histogram taken before).
        min/max of the difference are bucket bounds, not exact."""
        out = Histogram(self.bits, self.max_value)
        lo = hi = None
        for i, (a, b) in enumerate(zip(self.counts, earlier.counts)):
            d = a - b
            if d:
                out.counts[i] = d
                out.count += d
                if lo is None:
                    lo = i
                hi = i
        if lo is not None and hi is not None:
            out.min = self.bucket_bounds(lo)[0]
            out.max = self.bucket_bounds(hi)[1] - 1
            out.total = self.total - earlier.total
        return out

    # -- transport (between processes, into --json) ------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "max_value": self.max_value,
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(i): c for i, c in enumerate(self.counts) if c},
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Histogram":
        out = cls(int(obj["bits"]), int(obj["max_value"]))
        buckets: Mapping[str, int] = obj["buckets"]
        for key, c in buckets.items():
            i = int(key)
            if not 0 <= i < len(out.counts) or c < 0:
                raise ValueError("bucket out of range")
            out.counts[i] = int(c)
        out.count = int(obj["count"])
        out.total = int(obj["total"])
        out.min = int(obj["min"])
        out.max = int(obj["max"])
        return out

    @classmethod
    def merged(cls, parts: Iterable["Histogram"], bits: int = DEFAULT_BITS, max_value: int = DEFAULT_MAX) -> "Histogram":
        out = cls(bits, max_value)
        for part in parts:
            out.merge(part)
        return out
