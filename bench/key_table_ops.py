#!/usr/bin/env python
"""What the store's hot path costs with this build's key table against another build's (issue 13: the table cut
into shards, store.KeyTable): per operation, on a store of --keys keys (100-byte values, restored from a snapshot
as a node's start-up does), both builds' raftlib/server/store.py loaded in this one process (the module imports
nothing of raftlib) and timed in turn, pass after pass, so that both see the same machine:

    git archive main | tar -x -C /tmp/before
    python bench/key_table_ops.py --keys 1000000 --vs-build /tmp/before

get: KeyValueStore.get of a present key; lookup: the table's `get` alone; overwrite: apply of a SET of a present
key (the command decoded, the record replaced); create+delete: a SET of a new key, then its DELETE (the table and
the SortedList); page: a page of 100 keys; snapshot: encode_state of the whole state (a forked child's work in a
node). CPU time (time.thread_time), the best of --passes passes over 2,000 random keys (10 times each for the
reads; mostly in cache: the interpreter's part), in ns an operation; the snapshot's in ms, the best of 3.
Measures; asserts nothing. Note `uptime`: the machine is shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_store(build: str, name: str) -> Any:
    """The build's raftlib/server/store.py as a module of its own name."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(build, "raftlib", "server", "store.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and NamedTuples look their module up
    spec.loader.exec_module(module)
    return module


def operations(store: Any, snapshot: bytes, keys: int) -> dict[str, tuple[Callable[[], object], int]]:
    """A store of the build restored from `snapshot`, and each operation of the module's docstring over it, with
    the number of operations one call makes."""
    kv = store.KeyValueStore()
    kv.restore(snapshot)
    rng = random.Random(1)
    present = [f"k{rng.randrange(keys):09d}" for _ in range(2000)]
    present_10x = present * 10
    overwrite = [store.command(store.SET, k, b"w" * 100) for k in present]
    create = [store.command(store.SET, f"n{i:09d}", b"w" * 100) for i in range(2000)]
    delete = [store.command(store.DELETE, f"n{i:09d}") for i in range(2000)]
    index = [keys + 10]

    def get() -> None:
        for k in present_10x:
            kv.get(k)

    def lookup() -> None:
        table = kv.data
        for k in present_10x:
            table.get(k)

    def apply_all(commands: list[bytes]) -> None:
        i = index[0]
        for c in commands:
            i += 1
            kv.apply(i, c)
        index[0] = i

    def create_delete() -> None:
        apply_all(create)
        apply_all(delete)

    def page() -> None:
        for k in present:
            kv.page("k", k, 100)

    return {"get": (get, 20_000), "lookup": (lookup, 20_000), "overwrite": (lambda: apply_all(overwrite), 2000),
            "create+delete": (create_delete, 4000), "page": (page, 2000), "snapshot": (kv.snapshot, 0)}


def cpu_seconds(f: Callable[[], object]) -> float:
    t0 = time.thread_time()
    f()
    return time.thread_time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--vs-build", default=None, metavar="DIR", help="another checkout to compare with")
    p.add_argument("--passes", type=int, default=9)
    args = p.parse_args()
    import cbor2

    print(f"key_table_ops: {args.keys:,} keys; {os.popen('uptime').read().strip()}")
    snapshot = cbor2.dumps(["raftdzmq-kv-claims-v2", {f"k{i:09d}": b"v" * 100 for i in range(args.keys)}, {}, 0.0])
    builds = {"this build": ROOT} | ({args.vs_build: os.path.abspath(args.vs_build)} if args.vs_build else {})
    ops = {label: operations(load_store(path, f"store_{n}"), snapshot, args.keys)
           for n, (label, path) in enumerate(builds.items())}
    del snapshot
    best: dict[str, dict[str, float]] = {label: {} for label in ops}
    for name in ops["this build"]:
        for _ in range(3 if name == "snapshot" else args.passes):
            for label, by_name in ops.items():  # the builds in turn
                f, count = by_name[name]
                seconds = cpu_seconds(f)
                cost = seconds * 1000 if not count else seconds / count * 1e9
                best[label][name] = min(best[label].get(name, cost), cost)
    for label, costs in best.items():
        print(f"  {label}: " + ", ".join(f"{name} {cost:.0f} {'ms' if name == 'snapshot' else 'ns'}"
                                         for name, cost in costs.items()))
    if len(best) == 2:
        this, other = best.values()
        print("  ratios (this / other): " + ", ".join(f"{name} {this[name] / other[name]:.2f}x" for name in this))
    print(f"  {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
