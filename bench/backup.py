#!/usr/bin/env python
"""The backup bench (issue 15): how long GET /snapshot takes on a one-node cluster holding --keys keys of
--value-bytes, and how long it holds the node's event loop (the fork of the child, then streaming), seen from
outside as the slowest of back-to-back stale reads while one backup runs, against the same reads without one.

    python bench/backup.py --keys 100000

Speed is measured here, never asserted in a test. One run on a shared machine is noisy: note `uptime`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from procs import Node, wait_for  # noqa: E402

PUTS_PER_TXN = 100


def load(node: Node, keys: int, value_bytes: int) -> float:
    """Write `keys` keys through transactions of PUTS_PER_TXN puts, 16 at a time; returns the seconds taken."""

    def txn(first: int) -> None:
        puts = [{"op": "put", "key": f"k{i:08d}", "value": "v" * value_bytes}
                for i in range(first, min(first + PUTS_PER_TXN, keys))]
        body = json.dumps({"compare": [], "success": puts, "failure": []})
        wait_for(lambda: node.request("POST", "/txn", body, timeout=30).status == 200, 60, "a transaction")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(txn, range(0, keys, PUTS_PER_TXN)))
    return time.monotonic() - started


def slowest_reads(node: Node, during) -> tuple[int, float, float]:
    """(reads, median ms, max ms) of back-to-back stale reads while `during()` runs."""
    seconds: list[float] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            node.request("GET", "/db/k00000001?consistency=stale")
            seconds.append(time.monotonic() - t0)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        during()
    finally:
        stop.set()
        thread.join()
    seconds.sort()
    return len(seconds), 1000 * seconds[len(seconds) // 2], 1000 * seconds[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        node = Node("n", base)
        try:
            node.start("-snapshot-threshold", str(64 << 20))
            wait_for(lambda: node.status()["role"] == "leader", 10, "the node to lead")
            print(f"loaded {args.keys} keys in {load(node, args.keys, args.value_bytes):.1f}s")
            for _ in range(args.repeat):
                t0 = time.monotonic()
                r = node.request("GET", "/snapshot", timeout=600)
                took = time.monotonic() - t0
                assert r.status == 200 and hashlib.sha256(r.body).hexdigest() == r.headers["x-raft-snapshot-sha256"]
                print(f"backup: {len(r.body)} bytes at index {r.headers['x-raft-snapshot-index']} in {took:.2f}s")
            reads, median, most = slowest_reads(node, lambda: time.sleep(0.5))
            print(f"stale reads without a backup: {reads}, median {median:.1f} ms, max {most:.1f} ms")
            reads, median, most = slowest_reads(node, lambda: node.request("GET", "/snapshot", timeout=600))
            print(f"stale reads during a backup:  {reads}, median {median:.1f} ms, max {most:.1f} ms")
        finally:
            node.kill()
    print("load average:", open("/proc/loadavg").read().split()[:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
