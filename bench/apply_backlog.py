#!/usr/bin/env python
"""How long a follower's event loop is held while it applies a backlog of committed entries (issue 13): a node
that restored a snapshot, or was paused or cut off, finds thousands of entries committed at once. In this process:
a follower Runtime (memory storage, no peers) over a KeyValueStore of --keys keys, frozen as a node freezes its
state after start-up, holds --backlog overwrites of 100-byte values in its log, and one heartbeat commits them
all, while a greenlet delivers a heartbeat every 5 ms (as a leader does) and a probe sleeps 1 ms at a time.
With --ops K each entry is a transaction of K puts of consecutive keys (POST /txn, as bench/scale.py --batch K
loads), about K times the apply work of a plain write.
Reported, from that commit until the backlog is applied: the longest Ready processed (CPU time of one
Runtime._process_ready: the apply pieces), the hub lag (how late the probe woke: the longest the loop was held,
the machine's other processes included), the slowest heartbeat answer (from its send), the time until the
backlog is applied and the process's CPU time meanwhile. Measures; asserts nothing.

    python bench/apply_backlog.py --keys 300000 --backlog 5386
    python bench/apply_backlog.py --compare /work/main --rounds 5   # this checkout and another, alternating
    python bench/apply_backlog.py --keys 1000000 --backlog 2000 --ops 100 --compare /work/main

Each run is a fresh process (`--build` puts that checkout first on sys.path). Note `uptime` next to the figures:
the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(keys: int, backlog: int, ops: int = 1) -> dict:
    """One follower applying the backlog, in this process (the build first on sys.path)."""
    import gc
    import random

    import gevent

    from raftlib import AppendEntries, Config, Entry, EntryKind, HardState, Member, Membership, RaftNode
    from raftlib.memory_storage import MemoryStorage
    from raftlib.runtime import Runtime
    from raftlib.server.store import FEATURE_LEVEL, SET, SET_FEATURE_LEVEL, TXN, KeyValueStore, command

    value = b"v" * 100
    store = KeyValueStore(on_event=lambda event: None)
    store.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))  # TXN needs level 2 (else refused at once)
    for i in range(keys):
        store.apply(i + 2, command(SET, f"key{i:08d}", value))
    gc.collect()
    gc.freeze()  # as a node does after start-up (raftlib.server.tuning)

    membership = Membership(("a", "b"), (), (Member("a", "127.0.0.1:1", ""), Member("b", "127.0.0.1:2", "")))
    storage = MemoryStorage()
    storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", membership)])
    stored = storage.load()
    node = RaftNode(Config("b", election_ticks=1000), random.Random(1), stored.hard_state, stored.raft_log(),
                    stored.snapshot)

    class NoPeers:
        def set_peers(self, addresses):
            pass

        def send(self, messages):
            pass

    runtime = Runtime(node, storage, NoPeers(), store, tick_seconds=0.005)
    pieces: list[float] = []
    process_ready = runtime._process_ready

    def timed_process_ready(replies) -> None:
        cpu_started = time.thread_time()
        process_ready(replies)
        pieces.append(time.thread_time() - cpu_started)

    runtime._process_ready = timed_process_ready  # type: ignore[method-assign]
    runtime.start()
    last = backlog + 1

    def write(i: int) -> bytes:
        if ops == 1:
            return command(SET, f"key{(i * 7919) % keys:08d}", value)
        first = (i * 7919) % keys
        return command(TXN, "", b"", [[], [["put", f"key{(first + k) % keys:08d}", value] for k in range(ops)], []])

    entries = tuple(Entry(2, i, EntryKind.COMMAND, write(i)) for i in range(2, last + 1))
    lags: list[float] = []
    answers: list[float] = []
    done = False

    def probe() -> None:
        while not done:
            t0 = time.perf_counter()
            gevent.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    commit = 1

    def heartbeats() -> None:
        while not done:
            t0 = time.perf_counter()
            runtime.deliver([AppendEntries("a", "b", 2, last, 2, (), commit)], True)
            answers.append(time.perf_counter() - t0)
            gevent.sleep(0.005)

    runtime.deliver([AppendEntries("a", "b", 2, 1, 1, entries, 1)], True)  # in the log, not committed yet
    greenlets = [gevent.spawn(probe), gevent.spawn(heartbeats)]
    gevent.sleep(0.05)
    lags.clear()
    answers.clear()
    pieces.clear()
    started = time.perf_counter()
    cpu_started = time.thread_time()
    commit = last  # the next heartbeat commits the whole backlog
    runtime.wait_applied(last, 120.0)
    drained = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    gevent.sleep(0.02)
    done = True
    gevent.joinall(greenlets, timeout=1)
    runtime.stop()
    return {"keys": keys, "backlog": backlog, "ops": ops, "longest_ready_cpu_ms": round(max(pieces) * 1e3, 2),
            "readys_over_2ms": sum(p > 0.002 for p in pieces), "hub_lag_max_ms": round(max(lags) * 1e3, 2),
            "heartbeat_answer_max_ms": round(max(answers) * 1e3, 2), "drained_ms": round(drained * 1e3, 1),
            "cpu_ms": round(cpu * 1e3, 1), "cap": getattr(node.config, "max_committed_entries_per_ready", None),
            "loadavg": os.getloadavg()[0]}


def run_build(build: str, keys: int, backlog: int, ops: int) -> dict:
    """One run in a fresh process on `build`'s raftlib."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--build", build, "--keys", str(keys),
                          "--backlog", str(backlog), "--ops", str(ops), "--json"], check=True, capture_output=True, text=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=300_000)
    parser.add_argument("--backlog", type=int, default=5386)
    parser.add_argument("--ops", type=int, default=1, help="puts an entry: over 1, each entry a transaction")
    parser.add_argument("--build", default=HERE_ROOT, help="the checkout whose raftlib runs")
    parser.add_argument("--compare", help="another checkout: run both, alternating")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one run, its figures as one JSON line")
    args = parser.parse_args()
    if args.json:
        sys.path.insert(0, os.path.abspath(args.build))
        print(json.dumps(run_once(args.keys, args.backlog, args.ops)))
        return 0
    builds = [os.path.abspath(args.build)] + ([os.path.abspath(args.compare)] if args.compare else [])
    runs: dict[str, list[dict]] = {b: [] for b in builds}
    for _ in range(args.rounds):
        for build in builds:
            run = run_build(build, args.keys, args.backlog, args.ops)
            runs[build].append(run)
            print(build, run, flush=True)
    for build, results in runs.items():
        medians = {k: statistics.median(r[k] for r in results)
                   for k in ("longest_ready_cpu_ms", "hub_lag_max_ms", "heartbeat_answer_max_ms", "drained_ms", "cpu_ms", "loadavg")}
        print(f"{build}: median of {len(results)}: {medians}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
