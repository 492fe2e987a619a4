"""The garbage collector while serving: short collections at a steady pace.

A keepalive stores a new member and frees the old one, so CPython's own trigger (its
allocation count) hardly moved under a registration load while the young generation
filled with members; its collections then walked thousands of objects at a time
(0.5-2.3 ms pauses at 40,000 registrations a second). Serving collects the young
generations itself, every ``COLLECT_EVERY`` registrations.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_udp_port, nattool_cmd

from nattool.net.collector import COLLECT_EVERY, ServingCollector

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
print(json.dumps({"walks": walks, "registrations": counters.get("register", 0), "enabled": gc.isenabled(),
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
        assert json.loads(load.stdout)["answered"] > 15_000
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    walks = [tuple(w) for w in report["walks"]]
    registrations = report["registrations"]
    young = [walked for generation, walked in walks if generation == 1]
    print(f"\n{registrations} registrations, {len(young)} young collections, walked at most {max(young)} objects")
    # CPython's own collections are off: every collection is one of ours ...
    assert [w for w in walks if w[0] == 0] == []
    # ... one every COLLECT_EVERY registrations (and at the housekeeping ticks) ...
    assert len(young) >= registrations // COLLECT_EVERY
    # ... so that none walks much more than the members written since the last one.
    assert max(young) <= 4 * COLLECT_EVERY, sorted(young)[-5:]
    # Serving's start froze what existed; its end gave the collector back.
    assert report["enabled"] and report["frozen"] > 10_000


def test_a_full_collection_comes_once_its_interval_is_over() -> None:
    collector = ServingCollector(every=10, full_interval=5.0)
    enabled = gc.isenabled()
    try:
        collector.start(100.0)
        assert not gc.isenabled()
        collector.tick(3, 104.9)
        assert (collector.young, collector.full, collector.next_at) == (1, 0, 13)
        collector.collect_young(13)
        assert (collector.young, collector.next_at) == (2, 23)
        collector.tick(20, 105.0)
        assert (collector.young, collector.full, collector.next_at) == (2, 1, 30)
        collector.tick(21, 109.9)
        collector.tick(22, 110.0)
        assert collector.full == 2
    finally:
        collector.stop()
        gc.unfreeze()
    assert gc.isenabled() == enabled
