"""`nattool serve --workers N`: N processes on one port (SO_REUSEPORT), one store.

The kernel spreads datagrams over the workers by a hash of the source address and
port; the store is what makes them one tracker (SQLite in shared mode, where each
worker tails the others' appends, or Redis). The parent only starts, watches and
stops the workers, and prints the banner once all of them listen.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import sys
import time
from typing import Any, Callable

from nattool.errors import ConfigError, NattoolError, NetworkError
from nattool.logs import setup_logging
from nattool.net.server import ServerConfig

log = logging.getLogger("nattool.serve")

START_TIMEOUT = 30.0


def _worker_main(config: ServerConfig, stun: bool, index: int, events: Any, log_level: str) -> None:
    from nattool.net.eventloop import run as run_loop
    from nattool.net.server import serve
    from nattool.store.factory import open_store

    setup_logging(log_level, worker=index)
    try:
        store = open_store(config.store, config.limits, shared=True)
        counters = run_loop(serve(config, store, stun=stun, on_ready=lambda line: events.put(("ready", index, line))))
    except NattoolError as exc:
        events.put(("error", index, str(exc)))
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(130)
    log.info("event=stopped %s", " ".join(f"{k}={v}" for k, v in sorted(counters.items())))


def run_workers(
    config: ServerConfig,
    stun: bool,
    workers: int,
    log_level: str,
    on_ready: Callable[[str], None],
    on_signal: Callable[[signal.Signals], None],
) -> int:
    """Run ``workers`` server processes until SIGINT/SIGTERM (told to ``on_signal``);
    return 0, or 1 when a worker died."""
    if not hasattr(__import__("socket"), "SO_REUSEPORT"):
        raise ConfigError("--workers needs SO_REUSEPORT, which this platform lacks")
    if config.port == 0:
        raise ConfigError("--workers needs a fixed --port (with port 0 each worker would get its own)")
    config.reuse_port = True
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(config, stun, i, events, log_level), name=f"nattool-worker-{i}")
        for i in range(workers)
    ]
    stopping = {"flag": False}

    def stop() -> None:
        stopping["flag"] = True
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    p.terminate()  # SIGTERM: each worker stops cleanly
                except OSError:
                    pass

    def stop_on(signum: int, _frame: object) -> None:
        if not stopping["flag"]:
            on_signal(signal.Signals(signum))
        stop()

    old = {sig: signal.signal(sig, stop_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        ready: dict[int, str] = {}
        deadline = time.monotonic() + START_TIMEOUT
        while len(ready) < workers and not stopping["flag"]:
            try:
                kind, index, text = events.get(timeout=max(0.05, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    stop()
                    raise NetworkError("the workers did not start (see the log above)")
                continue
            if kind == "error":
                stop()
                raise NetworkError(f"worker {index}: {text}")
            ready[index] = text
        if stopping["flag"]:
            return 0
        on_ready(f"{ready[0]} x {workers} workers")
        while not stopping["flag"]:
            for p in procs:
                p.join(timeout=0.2)
                if p.exitcode is not None and not stopping["flag"]:
                    log.error("event=worker_died worker=%s exitcode=%s", p.name, p.exitcode)
                    stop()
                    return 1
        return 0
    finally:
        stop()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for sig, handler in old.items():
            signal.signal(sig, handler)
