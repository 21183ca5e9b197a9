#!/usr/bin/env python
"""The key table and the garbage collector (issue 13): what the collections of a node holding --keys keys cost
while it serves writes, by generation, for this build against another (--vs-build, e.g. the commit before
store.KeyTable, from git archive), alternating, in one run; and what a lookup in the table costs either way.

    git archive main | tar -x -C /tmp/before
    python bench/key_table_gc.py --keys 1000000 --vs-build /tmp/before --repeat 2

Each run: a backup of --keys keys (`k000000000`.., 100-byte values) restored into a fresh data dir
(`raftdzmq -restore`), one node started on it (its start-up restores the million keys, then gc.freeze), wrk writing
random keys of it (64 connections, --seconds), then SIGTERM. The node runs under this file (`_serve`, the build's
own raftdzmq.main) with a gc.callbacks hook noting each collection's generation, pause and end time
(time.monotonic: one clock for every process); only the collections inside wrk's window are reported, so the
start-up's do not mix in. Speed is measured here, never asserted in a test. Note `uptime`: the machine is shared.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_ENV, PAUSES_ENV = "KEY_TABLE_GC_BUILD", "KEY_TABLE_GC_PAUSES"
VALUE_BYTES = 100

WRK_LUA = """
local value = string.rep("v", %d)
local made = 0
function setup(thread) thread:set("tid", made); made = made + 1 end
function init(args) math.randomseed(1000 + tonumber(tid)) end
request = function()
  return wrk.format("POST", string.format("/db/k%%09d", math.random(0, %d - 1)), nil, value)
end
"""


def _serve() -> int:
    """The node's process: the build's raftdzmq.main, every collection noted (generation, seconds, end) and
    written to $KEY_TABLE_GC_PAUSES at exit. Only the imports above come before raftdzmq's (gevent's
    monkey-patching must come before ssl and threading)."""
    sys.path.insert(0, os.environ[BUILD_ENV])
    import raftdzmq  # its gevent monkey-patching comes first, as when it runs as the command

    noted: list[tuple[int, float, float]] = []
    started = [0.0]

    def note(phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            started[0] = now
        else:
            noted.append((info["generation"], now - started[0], now))

    def write() -> None:
        with open(os.environ[PAUSES_ENV], "w") as f:
            json.dump(noted, f)

    gc.callbacks.append(note)
    atexit.register(write)
    return raftdzmq.main(sys.argv[1:])


if __name__ == "__main__" and os.environ.get(BUILD_ENV):
    sys.exit(_serve())

import argparse  # noqa: E402  (the bench's own process from here on)
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import timeit  # noqa: E402
import urllib.request  # noqa: E402


def free_port() -> int:
    sys.path.insert(0, HERE)
    from load import free_port as load_free_port
    return load_free_port()


def write_backup(keys: int, path: str) -> None:
    """A backup file (GET /snapshot's format) of `keys` keys in the format below feature level 2."""
    import cbor2

    sys.path.insert(0, ROOT)
    from raftlib.messages import Membership, Snapshot
    from raftlib.server.store import SNAPSHOT_WITH_CLAIMS_V2
    from raftlib.snapshotfile import export_snapshot

    value = b"v" * VALUE_BYTES
    data = cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {f"k{i:09d}": value for i in range(keys)}, {}, 0.0])
    export_snapshot(Snapshot(keys, 1, Membership(("a",)), data), path)


def run_node(build: str, backup: str, workdir: str, keys: int, seconds: int) -> dict:
    """One run (the module's docstring): the collections during wrk's window, and wrk's figures."""
    data_dir, pauses_path = os.path.join(workdir, "data"), os.path.join(workdir, "pauses.json")
    shutil.rmtree(data_dir, ignore_errors=True)
    subprocess.run([sys.executable, os.path.join(build, "raftdzmq.py"), "-restore", backup, data_dir], check=True,
                   capture_output=True, timeout=300)
    http_port = free_port()
    with open(os.path.join(workdir, "node.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "-p", str(free_port()), "-hp",
                                 str(http_port), data_dir], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, BUILD_ENV: build, PAUSES_ENV: pauses_path})
    try:
        started = time.monotonic()
        while True:  # serving once the million keys are restored and it elected itself
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError(f"the node did not start (see {workdir}/node.log)")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/db/k000000000", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        startup_seconds = time.monotonic() - started
        script = os.path.join(workdir, "write.lua")
        with open(script, "w") as f:
            f.write(WRK_LUA % (VALUE_BYTES, keys))
        window = [time.monotonic()]
        wrk = subprocess.run(["wrk", "-t", "2", "-c", "64", "-d", f"{seconds}s", "--latency", "-s", script,
                              f"http://127.0.0.1:{http_port}"], capture_output=True, text=True, timeout=seconds + 60)
        if wrk.returncode:
            raise RuntimeError(f"wrk failed: {wrk.stderr.strip() or wrk.stdout.strip()}")
        out = wrk.stdout
        window.append(time.monotonic())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    with open(pauses_path) as f:
        noted = json.load(f)
    in_window = [(g, s) for g, s, end in noted if window[0] <= end <= window[1]]
    rate = next((float(line.split()[1]) for line in out.splitlines() if line.startswith("Requests/sec")), 0.0)
    p99 = next((line.split()[1] for line in out.splitlines() if line.strip().startswith("99%")), "?")
    return {"startup_seconds": startup_seconds, "writes_per_second": rate, "wrk_p99": p99,
            "pauses": [sorted(s for g, s in in_window if g == generation) for generation in range(3)]}


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))] if sorted_values else 0.0


def describe(run: dict) -> str:
    gens = []
    for generation, pauses in enumerate(run["pauses"]):
        gens.append(f"gen{generation} {len(pauses)}x total {sum(pauses) * 1000:.0f} ms p99 "
                    f"{percentile(pauses, 0.99) * 1000:.1f} max {max(pauses, default=0) * 1000:.1f} ms, "
                    f"{sum(s >= 0.010 for s in pauses)} >= 10 ms, {sum(s >= 0.050 for s in pauses)} >= 50 ms")
    return (f"{run['writes_per_second']:.0f} writes/s p99 {run['wrk_p99']}, start {run['startup_seconds']:.1f} s; "
            + "; ".join(gens))


def lookup_costs(keys: int, repeat: int) -> dict[str, dict[str, float]]:
    """ns per operation of the store's table operations on an exact dict and on store.KeyTable of `keys` records
    (its shards, dict subclasses, behind a Python method each),
    over 1,000 keys looked up 200 times (in cache: the interpreter's part), best of `repeat` alternating rounds."""
    sys.path.insert(0, ROOT)
    from raftlib.server.store import KeyTable

    records = {f"k{i:09d}": (b"v", i, i) for i in range(keys)}
    rng = random.Random(1)
    probe = [f"k{rng.randrange(keys):09d}" for _ in range(1000)] * 200
    new = (b"w", 1, 2)

    def get(t):
        for k in probe:
            t.get(k)

    def setitem(t):
        for k in probe:
            t[k] = new

    def contains(t):
        for k in probe:
            k in t  # noqa: B015

    tables = {"dict": dict(records), "KeyTable": KeyTable(records)}
    best: dict[str, dict[str, float]] = {name: {} for name in tables}
    for _ in range(repeat):
        for name, table in tables.items():
            for op in (get, setitem, contains):
                ns = timeit.timeit(lambda: op(table), number=1) / len(probe) * 1e9
                best[name][op.__name__] = min(best[name].get(op.__name__, ns), ns)
    return best


def table_walks(exact_dict: bool, keys: int, writes: int) -> dict:
    """In this process (run once per variant, each in its own process): a store restored with `keys` keys,
    gc.freeze as after start-up, then `writes` SETs of random keys, each with one cycle of garbage (a server makes
    some: the young collections run as in a node). Follows the table through the generations from the collector's
    callbacks (tracked again: in generation 0; moved up by each collection of its generation) and counts the
    collections that walked it, and their mean pause. Then, unfrozen (the table a restore while serving leaves),
    the best of five full collections. `exact_dict`: the table's dicts (KeyTable's shards) exact dicts, as before
    store.KeyTable made them subclasses; the table counts as tracked again once any of them is."""
    import cbor2

    sys.path.insert(0, ROOT)
    from raftlib.server import store
    from raftlib.server.tuning import freeze_after_start

    if exact_dict:
        store._Shard = dict  # type: ignore[misc]  # the build before the fix, in this process only
    kv = store.KeyValueStore()
    kv.restore(cbor2.dumps([store.SNAPSHOT_WITH_CLAIMS_V2, {f"k{i:09d}": b"v" * VALUE_BYTES for i in range(keys)},
                            {}, 0.0]))
    freeze_after_start()

    def tracked() -> bool:
        return any(gc.is_tracked(shard) for shard in kv.data.shards)

    frozen = tracked()  # tracked after the freeze's collection: frozen with the rest
    where: list[int | None] = [None]  # the table's generation while it is tracked and not frozen
    walked, passed = [[0, 0.0] for _ in range(3)], [[0, 0.0] for _ in range(3)]
    tracked_again, current = [0], [False, 0.0]

    def follow(phase: str, info: dict) -> None:
        generation = info["generation"]
        if phase == "start":
            if not frozen and where[0] is None and tracked():
                where[0] = 0
                tracked_again[0] += 1
            current[:] = [where[0] is not None and where[0] <= generation, time.perf_counter()]
            return
        tally = (walked if current[0] else passed)[generation]
        tally[0] += 1
        tally[1] += time.perf_counter() - current[1]
        where[0] = min(generation + 1, 2) if current[0] and tracked() else None if current[0] else where[0]

    gc.callbacks.append(follow)
    rng = random.Random(1)
    for w in range(writes):
        kv.apply(keys + 1 + w, store.command(store.SET, f"k{rng.randrange(keys):09d}", os.urandom(VALUE_BYTES)))
        garbage: list = [w]
        garbage.append(garbage)
    gc.callbacks.remove(follow)
    gc.unfreeze()
    full = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        full.append(time.perf_counter() - started)
    return {"frozen": frozen, "tracked_again": tracked_again[0], "walked": walked, "passed": passed,
            "full_collection_unfrozen": min(full), "tracked_unfrozen": tracked()}


def describe_walks(walks: dict) -> str:
    gens = "; ".join(f"gen{g} {walks['walked'][g][0]}x walking it (mean "
                     f"{walks['walked'][g][1] / max(1, walks['walked'][g][0]) * 1000:.0f} ms), "
                     f"{walks['passed'][g][0]}x not (mean "
                     f"{walks['passed'][g][1] / max(1, walks['passed'][g][0]) * 1000:.1f} ms)" for g in range(3))
    return (f"frozen at start {walks['frozen']}, tracked again {walks['tracked_again']}x; {gens}; unfrozen: a full "
            f"collection {walks['full_collection_unfrozen'] * 1000:.0f} ms, table tracked {walks['tracked_unfrozen']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--seconds", type=int, default=20, help="seconds of writes per run (default 20)")
    p.add_argument("--vs-build", action="append", default=[], metavar="DIR", help="another checkout to alternate with")
    p.add_argument("--repeat", type=int, default=1, help="alternate the builds this many times")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--in-process", type=int, metavar="WRITES", help="instead: follow the table through the "
                   "collections in process (table_walks), exact dict against KeyTable, alternating --repeat times")
    p.add_argument("--variant", choices=["dict", "KeyTable"], help=argparse.SUPPRESS)  # one --in-process run
    args = p.parse_args()
    if args.variant:
        print(json.dumps(table_walks(args.variant == "dict", args.keys, args.in_process)))
        return 0
    if args.in_process:
        for _ in range(args.repeat):
            for variant in ("dict", "KeyTable"):
                out = subprocess.run([sys.executable, __file__, "--keys", str(args.keys), "--in-process",
                                      str(args.in_process), "--variant", variant], capture_output=True, text=True,
                                     timeout=1800, check=True).stdout
                print(f"{variant}: {describe_walks(json.loads(out))} (load {os.getloadavg()[0]:.1f})", flush=True)
        return 0
    builds = [ROOT] + [os.path.abspath(b) for b in args.vs_build]
    workdir = tempfile.mkdtemp(prefix="key-table-gc-")
    results: dict = {"uptime": [], "runs": {b: [] for b in builds}}
    try:
        backup = os.path.join(workdir, "backup")
        write_backup(args.keys, backup)
        for _ in range(args.repeat):
            for build in builds:
                results["uptime"].append(os.getloadavg()[0])
                run = run_node(build, backup, workdir, args.keys, args.seconds)
                results["runs"][build].append(run)
                print(f"{build}: {describe(run)} (load {results['uptime'][-1]:.1f})", flush=True)
        results["lookup_ns"] = lookup_costs(args.keys, 9)
        for name, ops in results["lookup_ns"].items():
            print(f"lookup {name}: " + ", ".join(f"{op} {ns:.0f} ns" for op, ns in ops.items()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
