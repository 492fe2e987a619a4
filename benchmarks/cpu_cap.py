"""Hold processes to a share of one core each: a cgroup CPU quota (Linux, root).

On a 2-core machine the load generator needs most of one core, so a server given
the other runs into the machine's ceiling, not its own: both sides use a whole core
and on loopback each side's send also runs the other's receive path. Holding every
server to the same share of a core makes the server the limit, so that rates
compare what each server does with the same CPU. Used by ``run_benchmarks.py
--cap`` and ``workers_scaling.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional

PERIOD_US = 10_000  # short, so a capped process is throttled often and briefly


class CpuCapError(Exception):
    """The cap cannot be set here (no cgroup CPU controller, or not root)."""


class CpuCap:
    """One cgroup per process, each with the same CPU quota (cgroup v1 ``cpu`` or v2 ``cpu.max``)."""

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise CpuCapError(f"a CPU cap is a share of one core, above 0 and at most 1, not {share:g}")
        self.share = share
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        try:
            if v2.exists():
                self.root, self.v2 = Path("/sys/fs/cgroup"), True
                (self.root / "cgroup.subtree_control").write_text("+cpu")
            elif Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
                self.root, self.v2 = Path("/sys/fs/cgroup/cpu"), False
            else:
                raise CpuCapError("no cgroup CPU controller here (Linux cgroup v1 cpu or v2 cpu.max)")
        except OSError as exc:
            raise CpuCapError(f"cannot enable the cgroup CPU controller ({exc.strerror}; root needed)") from None
        self.groups: list[Path] = []

    def put(self, pids: list[int]) -> None:
        """Give each of ``pids`` (with all its threads) a cgroup of its own, capped."""
        quota = int(self.share * PERIOD_US)
        for pid in pids:
            group = self.root / f"nattool-bench-{os.getpid()}-{len(self.groups)}"
            try:
                group.mkdir()
                self.groups.append(group)
                if self.v2:
                    (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                else:
                    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                    (group / "cpu.cfs_quota_us").write_text(str(quota))
                (group / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                raise CpuCapError(f"cannot cap process {pid} in {group} ({exc.strerror}; root needed)") from None

    def remove(self) -> None:
        """Remove the cgroups; call once their processes have exited."""
        for group in self.groups:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:  # its process is still exiting
                    time.sleep(0.1)
        self.groups.clear()


def cap_option(parser: argparse.ArgumentParser, share: Optional[float]) -> Optional[CpuCap]:
    """The cap a ``--cap SHARE`` option asks for, None without one; a cap that cannot be
    set here is the parser's error (it exits)."""
    if share is None:
        return None
    try:
        return CpuCap(share)
    except CpuCapError as exc:
        parser.error(f"--cap: {exc}")
