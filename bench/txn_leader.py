"""The leader's Python for one POST /txn of N puts, in process: the body's parse (routes_txn.parse_txn), the
command's encoding, the apply on a node's store with its watch history (node.WatchedStore) from the entry's bytes
(every node, the leader too), the entry's decoding alone (cbor2.loads: what a leader applying the list it encoded
would save; the txn3 branch measured that and did not keep it), and the answer's text. Each round on a fresh
store; best and median of the rounds, in CPU time per txn. Run: python bench/txn_leader.py [rounds, default 7] [puts, default 10]. Measures;
asserts nothing.

`--gc`: the garbage collector's share instead: 20,000 txns through parse, apply (with the watch history, 10,000
events) and answer, timed by gc.callbacks, in three settings alternating: as the node runs; watch events as plain
tuples (a what-if: store.Event replaced for the run; CPython untracks a plain tuple of atoms at its first
collection, never a NamedTuple); a young generation of 7,000 objects (gc.set_threshold) in place of 700."""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import sys
import time

import cbor2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftlib.server import store as store_module  # noqa: E402
from raftlib.server.node import WatchedStore  # noqa: E402
from raftlib.server.routes_txn import parse_txn, txn_answer_json  # noqa: E402
from raftlib.server.store import FEATURE_LEVEL, SET_FEATURE_LEVEL, TXN, command  # noqa: E402
from raftlib.server.watch import WatchHub  # noqa: E402

TXNS = 2000


def gc_share(rounds: int) -> None:
    rng = random.Random(2)
    bodies = [json.dumps({"success": [{"op": "put", "key": f"k{rng.randrange(10_000)}/{j}", "value": "v" * 100}
                                      for j in range(10)]}).encode() for _ in range(20_000)]
    event, threshold = store_module.Event, gc.get_threshold()
    started = [0.0]
    spent: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            spent.append(time.process_time() - started[0])

    gc.callbacks.append(callback)
    took: dict[str, list[tuple[float, float, int]]] = {}
    for _ in range(rounds):
        for name in ("as the node runs", "events as plain tuples", "gc threshold 7,000"):
            store = WatchedStore(WatchHub(), lambda: None)
            store.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
            if name == "events as plain tuples":
                store_module.Event = tuple  # type: ignore[misc, assignment]
            if name == "gc threshold 7,000":
                gc.set_threshold(7000, *threshold[1:])
            gc.collect()
            gc.freeze()  # as the node does after its start (tuning.freeze_after_start)
            spent.clear()
            t0 = time.process_time()
            for i, body in enumerate(bodies, 2):
                txn_answer_json(store.apply(i, command(TXN, "", b"", parse_txn(body))), i)  # type: ignore[arg-type]
            cpu = time.process_time() - t0
            store_module.Event = event  # type: ignore[misc]
            gc.set_threshold(*threshold)
            gc.unfreeze()
            took.setdefault(name, []).append((cpu / len(bodies) * 1e6, sum(spent) / len(bodies) * 1e6, len(spent)))
    print(f"20,000 txns of 10 puts, {rounds} rounds, load average {os.getloadavg()[0]:.1f}: CPU us a txn, of which "
          "the collector's (median of the rounds), collections a round")
    for name, runs in took.items():
        print(f"  {name:24} {statistics.median(r[0] for r in runs):6.1f}  gc {statistics.median(r[1] for r in runs):5.1f}"
              f"  collections {statistics.median(r[2] for r in runs):.0f}")


def main() -> None:
    if "--gc" in sys.argv:
        sys.argv.remove("--gc")
        gc_share(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    puts = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    rng = random.Random(1)
    bodies = [json.dumps({"success": [{"op": "put", "key": f"k{rng.randrange(1000)}/{j}", "value": "v" * 100}
                                      for j in range(puts)]}).encode() for _ in range(TXNS)]
    took: dict[str, list[float]] = {}

    def timed(name: str, work) -> list:
        t0 = time.process_time()
        out = [work(x) for x in items]
        took.setdefault(name, []).append((time.process_time() - t0) / TXNS * 1e6)
        return out

    for _ in range(rounds):
        items = bodies
        parsed = timed("parse_txn", parse_txn)
        items = parsed
        timed("command (cbor2)", lambda body: command(TXN, "", b"", body))
        encoded = [command(TXN, "", b"", body) for body in parsed]
        items = encoded
        timed("decode (cbor2.loads)", cbor2.loads)
        store = WatchedStore(WatchHub(), lambda: None)
        store.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
        items = list(enumerate(encoded, 2))
        results = timed("apply, from the bytes", lambda x: store.apply(x[0], x[1]))
        items = list(enumerate(results, 2))
        timed("the answer", lambda x: txn_answer_json(x[1], x[0]))
    print(f"{TXNS} txns of {puts} puts, {rounds} rounds, load average {os.getloadavg()[0]:.1f}: CPU us a txn")
    for name, values in took.items():
        print(f"  {name:24} best {min(values):6.1f}  median {statistics.median(values):6.1f}")


if __name__ == "__main__":
    main()
