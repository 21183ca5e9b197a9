#!/usr/bin/env python
"""The longest step of restoring a snapshot (issue 13): a follower restores a leader's snapshot a step per turn of
its event loop (KeyValueStore.restoring), so the longest step is the longest its heartbeats and votes wait. This
builds a feature-level-2 state in this process (--keys keys of --value-bytes, the first --leases of them each on a
lease of its own, as `POST /db/KEY?ttl=S` makes them), encodes its snapshot (V3) and restores it into an empty
store step by step, timing every step (wall and CPU time), then frees it. Measures; asserts nothing.

    python bench/restore_steps.py --keys 100000 --leases 100000
    python bench/restore_steps.py --keys 1000000 --leases 0 --repeat 3

The collector runs as in a node (a collection may fall in a step: it is in that step's time); `--freeze` first
freezes what exists (a node's gc.freeze after start-up, raftlib.server.tuning); `--collector-off` disables it
during each restore (what the steps cost without it); `--compare` runs each restore twice, alternating, with the
collector as in a node before issue 13's hold and with raftlib.runtime.CollectorHold as the runtime holds it now
(off, a young collection after each step, in the step's time; the state frozen at the end), after a
gc.freeze of what exists as a node has. Note `uptime` next to the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
from typing import Any
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftlib.runtime import CollectorHold  # noqa: E402
from raftlib.server.store import (  # noqa: E402
    FEATURE_LEVEL, PUT_WITH_TTL, SET, SET_FEATURE_LEVEL, KeyValueStore, command)


def build_state(keys: int, leases: int, value_bytes: int) -> KeyValueStore:
    """A store of level 2 holding `keys` keys k000000000.., the first `leases` each on a lease of its own."""
    kv = KeyValueStore()
    kv.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
    value = b"v" * value_bytes
    for i in range(keys):
        key = f"k{i:09d}"
        kv.apply(i + 2, command(PUT_WITH_TTL, key, value, 60) if i < leases else command(SET, key, value))
    return kv


def table_being_built(steps: Any) -> Any:
    """The key table `steps` (KeyValueStore.restoring) is filling, found through the generators' frames (the
    bench's business only: the store does not show it), or None before it exists."""
    for inner in gc.get_referents(steps):  # the generator `restoring` runs (_decode), on its frame's stack
        if inspect.isgenerator(inner) and inner.gi_frame is not None:
            new = inner.gi_frame.f_locals.get("new")
            return getattr(new, "table", new)  # a builder's table, or the table itself
    return None


def table_bytes(table: Any) -> int:
    """The bytes of a key table's hash tables: a change between two steps is a dict's resize in that step."""
    if table is None:
        return 0
    shards = getattr(table, "shards", None)
    return sum(map(sys.getsizeof, shards)) if shards is not None else sys.getsizeof(table)


def restore_steps(snapshot: bytes, hold: CollectorHold | None = None) -> dict:
    """Restore `snapshot` into an empty store a step at a time: each step's wall and CPU milliseconds, the
    collector's milliseconds in it (by generation), whether the table being filled grew its hash table in it (a
    dict's resize: it copies the dict whole), the step that replaced the state, and the restored store.
    With `hold`, the collector is held as the runtime holds it (its young collection in each step's time)."""
    target = KeyValueStore()
    if hold is not None:
        hold.hold()
    steps = target.restoring(snapshot)
    wall: list[float] = []
    cpu: list[float] = []
    collected: list[list[float]] = []
    resized: list[bool] = []
    in_gc = [0.0, 0.0, 0.0]
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            in_gc[info["generation"]] += (time.perf_counter() - started[0]) * 1000

    replaced_at = -1
    gc.callbacks.append(on_gc)
    try:
        while True:
            in_gc[:] = [0.0, 0.0, 0.0]
            table_before = table_bytes(table_being_built(steps))
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                replaced = next(steps)
            except StopIteration:
                if hold is not None:  # the release (a young collection, the freeze, a sweep) in the last step
                    hold.release(freeze=True)
                    wall[-1] += (time.perf_counter() - t0) * 1000
                    cpu[-1] += (time.thread_time() - c0) * 1000
                    collected[-1] = [before + now for before, now in zip(collected[-1], in_gc)]
                break
            if hold is not None:
                hold.after_step()
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
            collected.append(list(in_gc))
            resized.append(not replaced and table_bytes(table_being_built(steps)) > max(table_before, 4096))
            if replaced:
                replaced_at = len(wall) - 1
    finally:
        gc.callbacks.remove(on_gc)
        if hold is not None:
            hold.release(freeze=False)
    return {"wall": wall, "cpu": cpu, "gc": collected, "resized": resized, "replaced_at": replaced_at, "store": target}


def describe_steps(run: dict) -> str:
    """Longest, p99 and median of the steps' CPU and wall times, and the steps in which a dict grew (resized)."""
    def figures(ms: list[float]) -> str:
        ordered = sorted(ms)
        return (f"longest {ordered[-1]:.1f} p99 {ordered[int(0.99 * (len(ordered) - 1))]:.1f} median "
                f"{statistics.median(ordered):.2f} ms" if ordered else "none")

    grew = [i for i, r in enumerate(run["resized"]) if r]
    others = [c for c, r in zip(run["cpu"], run["resized"]) if not r]
    return (f"{len(run['cpu'])} steps; CPU {figures(run['cpu'])}; wall {figures(run['wall'])}; {len(grew)} steps "
            f"grew the table (a dict resize): CPU {figures([run['cpu'][i] for i in grew])}; the other steps' CPU "
            f"{figures(others)}; over 10 ms CPU: {sum(c > 10 for c in run['cpu'])} steps, at "
            f"{[i for i, c in enumerate(run['cpu']) if c > 10][:8]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--leases", type=int, default=100_000, help="keys each on a lease of its own (at most --keys)")
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--freeze", action="store_true", help="gc.freeze() the built state before restoring")
    p.add_argument("--collector-off", action="store_true", help="gc.disable() while restoring (what is left)")
    p.add_argument("--compare", action="store_true", help="the collector as before vs CollectorHold, alternating")
    args = p.parse_args()
    print(f"restore_steps: {args.keys:,} keys of {args.value_bytes} bytes, {min(args.leases, args.keys):,} leases; "
          f"{os.popen('uptime').read().strip()}")
    t0 = time.perf_counter()
    kv = build_state(args.keys, min(args.leases, args.keys), args.value_bytes)
    snapshot = kv.snapshot()
    print(f"  built and encoded in {time.perf_counter() - t0:.1f}s: a snapshot of {len(snapshot):,} bytes")
    if args.freeze or args.compare:
        gc.collect()
        gc.freeze()
    longest_of: dict[str, list[float]] = {"as before": [], "held": []}  # wall ms, then CPU ms (`cpu` + mode)
    sweeps: list[tuple[float, float]] = []  # CollectorHold.sweep() after each run: wall, CPU ms
    for run in range(args.repeat * (2 if args.compare else 1)):
        if args.collector_off:
            gc.disable()
        mode = ("as before", "held")[run % 2] if args.compare else ""
        r = restore_steps(snapshot, CollectorHold() if mode == "held" else None)
        gc.enable()
        if mode:
            print(f"  {mode}:", end="")
            longest_of[mode].append(max(r["wall"]))
            longest_of.setdefault("cpu " + mode, []).append(max(r["cpu"]))
        wall, cpu = r["wall"], r["cpu"]
        longest = max(range(len(wall)), key=wall.__getitem__)
        own = [w - sum(g) for w, g in zip(wall, r["gc"])]  # less the collector's time in the step
        print(f"  run {run + 1}: {len(wall)} steps, {sum(wall):.0f} ms in all; longest {wall[longest]:.1f} ms wall "
              f"({cpu[longest]:.1f} ms CPU; collector {'/'.join(f'{g:.0f}' for g in r['gc'][longest])} ms by "
              f"generation) at step {longest} (the state replaced at step {r['replaced_at']}); longest CPU "
              f"{max(cpu):.1f} ms; longest less the collector {max(own):.1f} ms; median {statistics.median(wall):.2f}"
              f" ms; the same state: {r['store'].snapshot() == snapshot}")
        print("    " + describe_steps(r))
        del r
        if mode:  # the held run froze its restored state: the next run starts from the same frozen set
            t0, c0 = time.perf_counter(), time.thread_time()
            CollectorHold.sweep()  # what a node's restore ends with once its frozen garbage may be many objects
            sweeps.append(((time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000))
    if args.compare:
        print("  medians of the longest step (wall; CPU, what the machine's other processes do not add): " + ", ".join(
            f"{mode} {statistics.median(v):.1f} ms" for mode, v in longest_of.items()))
        print(f"  CollectorHold.sweep() of this process (the built state, {gc.get_freeze_count():,} objects frozen): "
              f"median {statistics.median(w for w, _ in sweeps):.1f} ms wall, "
              f"{statistics.median(c for _, c in sweeps):.1f} ms CPU, of {len(sweeps)}")
    print(f"  {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
