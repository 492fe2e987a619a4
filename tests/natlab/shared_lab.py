"""Many lab cases in one NAT lab, run at once: their waits overlap instead of adding up.

One server host (SERVER_V4 + SERVER_V6) with the servers a test module starts, then per
case its own NAT and client. Each case keeps its own pytest test id and assertions::

    @pytest.fixture(scope="module")
    def runs(natlab_available):
        with cases_in_one_lab(BEHAVIOURS, start_servers, run_case, len(BEHAVIOURS)) as shared:
            yield shared

    @pytest.mark.parametrize("behaviour", BEHAVIOURS)
    def test_case(runs, behaviour):
        check_case(runs, behaviour, check)
"""

from __future__ import annotations

import contextlib
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

from .lab import Lab, ServerHost
from .nft import NatBehaviour
from .topologies import SERVER_V4, SERVER_V6, ProbeTopology

S = TypeVar("S")
R = TypeVar("R")
SharedLab = tuple[Lab, dict[NatBehaviour, Future[R]]]


@contextlib.contextmanager
def shown_on_failure(lab: Lab) -> Iterator[None]:
    """For tests that share a lab: when the block fails, print the lab's addresses, routes
    and rulesets (as the natlab fixture does for a lab of one test)."""
    try:
        yield
    except BaseException:
        print(f"--- shared NAT lab at failure ---\n{lab.describe()}", file=sys.stderr)
        raise


@contextlib.contextmanager
def cases_in_one_lab(behaviours: Sequence[NatBehaviour], start_servers: Callable[[Lab, ServerHost], S],
                     case: Callable[[Lab, ProbeTopology, NatBehaviour, S], R],
                     workers: int) -> Iterator[SharedLab[R]]:
    """One lab for many cases: a server host (SERVER_V4 + SERVER_V6) with the servers that
    ``start_servers`` starts, then per behaviour a NAT ("natN") with a client ("clientN"),
    and ``case`` run for each, ``workers`` at a time. The cases share nothing but the server
    host (each NAT has its own WAN address), so their waits overlap instead of adding up."""
    with Lab() as lab:
        server = lab.add_server_host("srv", addrs=[*SERVER_V4, *SERVER_V6])
        servers = start_servers(lab, server)
        with ThreadPoolExecutor(workers) as pool:
            runs = {}
            for n, behaviour in enumerate(behaviours):
                nat = lab.add_nat(f"nat{n}", behaviour)
                topo = ProbeTopology(server, nat, lab.add_host(f"client{n}", behind=nat))
                runs[behaviour] = pool.submit(case, lab, topo, behaviour, servers)
        yield lab, runs


def check_case(shared: SharedLab[R], behaviour: NatBehaviour, check: Callable[[R, NatBehaviour], None]) -> None:
    """``check`` the result of ``behaviour``'s case (its exception, if it raised one)."""
    lab, runs = shared
    with shown_on_failure(lab):
        check(runs[behaviour].result(), behaviour)
