"""The garbage collector while serving: short collections at a steady pace.

A keepalive stores a new member and frees the old one, so CPython's own trigger (its
allocation count) hardly moved under a registration load while the young generation
filled with members; its collections then walked thousands of objects at a time
(0.5-2.3 ms pauses at 40,000 registrations a second). Serving collects the young
generations itself, every ``COLLECT_EVERY`` registrations, leaves CPython's trigger
on for what does grow the count, and runs full collections on a clock of its own.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from conftest import free_udp_port, nattool_cmd

from nattool.net.collector import COLLECT_EVERY, NEVER, ServingCollector
from nattool.net.server import DRAIN_BATCH

# A tracker in a process of its own (the test must not switch pytest's collector off),
# which records how many objects each collection walked once serving has started.
SERVING = """
import asyncio, gc, json, sys
from nattool.net.server import ServerConfig, serve
from nattool.store.base import StoreLimits
from nattool.store.memory import MemoryStore

walks = []

def watch(phase, info):
    if phase == "start":
        generation = info["generation"]
        walked = sum(len(gc.get_objects(g)) for g in range(generation + 1)) if generation < 2 else -1
        walks.append((generation, walked))

def ready(line):
    gc.callbacks.append(watch)
    print("ready", flush=True)

config = ServerConfig(hosts=("127.0.0.1",), port=int(sys.argv[1]), rate_limit=0)
counters = asyncio.run(serve(config, MemoryStore(StoreLimits()), on_ready=ready))
gc.callbacks.remove(watch)
print(json.dumps({"walks": walks, "registrations": counters.get("register", 0), "thresholds": gc.get_threshold(),
                  "frozen": gc.get_freeze_count()}), flush=True)
"""


def test_serving_collects_the_young_generations_every_so_many_registrations(tmp_path: Path) -> None:
    port = free_udp_port()
    script = tmp_path / "serving.py"
    script.write_text(SERVING)
    server = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", server.stderr.read() if server.stderr else ""
        load = subprocess.run(
            nattool_cmd("bench", f"127.0.0.1:{port}", "--mix", "register=1", "--groups", "200", "--members", "2000",
                        "--rate", "10000", "--duration", "2", "--warmup", "0.5", "--sockets", "256", "--json"),
            capture_output=True, text=True, timeout=60,
        )
        assert load.returncode == 0, load.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    walks = [tuple(w) for w in report["walks"]]
    registrations = report["registrations"]
    young = [walked for generation, walked in walks if generation == 1]
    print(f"\n{registrations} registrations, {len(walks)} collections, walked at most {max(w for _, w in walks)} objects")
    # Enough registrations to count the collections by (a busy machine serves fewer than
    # the 25,000 asked for).
    assert registrations >= 10 * COLLECT_EVERY, registrations
    # One collection of the young generations every COLLECT_EVERY registrations: the count
    # is looked at after each read of up to DRAIN_BATCH datagrams, so on a busy machine,
    # where the reads are full, one may come up to DRAIN_BATCH - 1 registrations late ...
    assert len(young) >= registrations // (COLLECT_EVERY + DRAIN_BATCH - 1) - 1, (registrations, len(young))
    # ... so that none walks much more than the members written since the last one,
    assert max(walked for _, walked in walks) <= 4 * COLLECT_EVERY, sorted(walks)[-5:]
    # and no full collection while serving (not CPython's: its threshold is out of reach).
    assert [w for w in walks if w[0] == 2] == []
    # Serving's start froze what existed; its end gave CPython its thresholds back.
    assert report["frozen"] > 10_000 and tuple(report["thresholds"]) == gc.get_threshold()


@contextmanager
def serving(collector: ServingCollector, now: float) -> Iterator[list[tuple[int, int]]]:
    """The collector started in this process, and the collections made meanwhile:
    (generation, objects walked; -1 for a full one). Everything is given back after."""
    walks: list[tuple[int, int]] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generation = info["generation"]
            walked = sum(len(gc.get_objects(g)) for g in range(generation + 1)) if generation < 2 else -1
            walks.append((generation, walked))

    collector.start(now)
    gc.callbacks.append(watch)
    try:
        yield walks
    finally:
        gc.callbacks.remove(watch)
        collector.stop()
        gc.unfreeze()


def test_cpython_still_collects_what_grows_its_count() -> None:
    """A flood from new sources fills the rate limiter's table with new objects: that
    grows CPython's count, and its own young collections keep coming."""
    before = gc.get_threshold()
    kept: list[list[float]] = []
    with serving(ServingCollector(), 0.0) as collections:
        assert gc.get_threshold()[2] == NEVER
        for n in range(50_000):
            kept.append([float(n), 0.0])
    walks = [walked for generation, walked in collections if generation < 2]
    assert gc.get_threshold() == before
    assert len(walks) >= 50_000 // (before[0] + 50)
    assert max(walks) <= 20 * before[0] * before[1], max(walks)


def test_a_full_collection_comes_once_its_interval_is_over() -> None:
    collector = ServingCollector(every=10, full_interval=5.0)
    before = gc.get_threshold()
    with serving(collector, 100.0) as collections:

        def fulls() -> list[tuple[int, int]]:
            return [c for c in collections if c[0] == 2]

        collector.tick(104.9)
        assert (collector.full, fulls()) == (0, [])
        collector.collect_young(13)
        assert (collector.young, collector.next_at) == (1, 23)
        collector.tick(105.0)
        assert (collector.full, len(fulls())) == (1, 1)
        collector.tick(109.9)
        assert collector.full == 1
        collector.tick(110.0)
        assert (collector.full, len(fulls())) == (2, 2)
    assert gc.get_threshold() == before
