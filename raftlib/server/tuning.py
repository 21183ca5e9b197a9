"""Process tuning for the tail of the latency: the garbage collector's pauses, and the instrument that measures them.

CPython's cyclic collector stops the whole process (every greenlet, the event loop with it) while it runs; a
collection of the oldest generation walks every tracked object, so its pause grows with the state machine and the
log in memory. `GcPauses` times each collection with `gc.callbacks` so the pauses can be seen; it is off unless
$RAFTDZMQ_GC_STATS names a folder, where the process writes `gc-PID.json` when it exits (bench/load.py
--gc-stats reads them).

Rules:
- Nothing here changes what the server computes: only when the collector runs.
- Everything runs on the event loop's thread, at start-up or inside the collector's own callbacks: no locks.
- A setting is here only if an alternating A/B run showed it helps (docs/BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import time

from ..runtime import CollectorHold

STATS_ENV = "RAFTDZMQ_GC_STATS"

log = logging.getLogger("raftdzmq.tuning")


class GcPauses:
    """How long each collection of each generation took: count, total and max seconds, and every pause of 1 ms or
    more (for percentiles). Installed in gc.callbacks by `install`."""

    LONG_SECONDS = 0.001

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_seconds = [0.0, 0.0, 0.0]
        self.max_seconds = [0.0, 0.0, 0.0]
        self.long_seconds: list[list[float]] = [[], [], []]
        self._started = 0.0

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation, seconds = info["generation"], time.perf_counter() - self._started
        self.count[generation] += 1
        self.total_seconds[generation] += seconds
        self.max_seconds[generation] = max(self.max_seconds[generation], seconds)
        if seconds >= self.LONG_SECONDS:
            self.long_seconds[generation].append(round(seconds, 6))

    def install(self) -> None:
        gc.callbacks.append(self.callback)

    def as_dict(self) -> dict:
        return {"count": self.count, "total_seconds": self.total_seconds, "max_seconds": self.max_seconds,
                "long_seconds": self.long_seconds, "threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}


class FreezeSurvivors:
    """What survives a collection of generation 1 or 2 frozen (gc.freeze in its stop callback), so no full
    collection walks it: under writes a leader's full collections walked the Raft log's entries again each time
    (up to ~105,000 `Entry` and the watch history's ~10,000 `Event` of ~117,000 objects, 90-116 ms at 64 clients:
    docs/BENCHMARKS.md, "The collector under sustained writes"), each a pause of the event loop. Frozen at full
    collections only, each still walked what generation 1 had promoted since the one before: at 1,000,000 keys
    under ~1,000-1,700 writes/s, 30,000-52,000 entries and events, 13-31 ms of CPU about every 40 s on leader and
    followers alike ("The lags over 10 ms left at 1,000,000 keys"). Frozen as generation 1 promotes them, they are
    walked by the two young generations' collections only, which walk them anyway. gc.freeze sets every
    generation's count to 0 (checked on CPython 3.11 only: pyproject allows 3.10 and later, and 3.14's incremental
    collector has other generations), so the collector then starts no full collection of its own: they come as
    sweeps (below) or when called.

    Frozen objects are still freed by their reference count (a compacted entry, an evicted event); a cycle of
    garbage among them is not: an object alive at a freeze that later dies in a cycle (a request in flight then)
    stays frozen until a sweep: a stop unfreezes everything (CollectorHold.begin_sweep), the counts then grow
    until the collector's next full collection walks the whole heap, frees that garbage, and its stop freezes what
    lives (`end_sweep`); the middle collections meanwhile freeze nothing. A sweep is armed at a stop when either
    - SWEEP_SECONDS have passed since the last sweep, whatever the counts: frozen garbage lives at most that long
      plus the time to the next collection of generation 1 and the full collection after it (a node making no
      garbage may run none for a while); or
    - the frozen count passes SWEEP_GROWTH times `frozen_floor` plus SWEEP_SLACK objects, `frozen_floor` being the
      lowest count measured since the last sweep (not the count right after it: that one may come at the log's
      peak, and at 1M keys it put the next sweep past what the 16 MiB log holds, review of gcpause, L3; measured
      at a stop at least FLOOR_SECONDS after the last count, and at the bound's crossings, so a trough between
      two counts may be missed). Frozen garbage stays under that many objects plus what the stops freeze within
      COUNT_SECONDS after a count (below). Counted in objects, not bytes: an object may hold a request's body (up to
      -max-body), which is why the edge cuts its cycles (edge.py) rather than leave them to this.
    A sweep is one pause of a full collection of the whole heap, the key table included: 59 ms of CPU at 1,000,000
    keys on a quiet machine, 109-205 ms under load (docs/BENCHMARKS.md, "Snapshot restore steps and the fork
    pause at 1,000,000 keys", CollectorHold's sweeps); so every full collection was before this policy.

    Counting: gc.get_freeze_count() walks the frozen list in CPython 3.11 (3.4 ms at 1M frozen; 2-12 ms at
    37,000-88,000 in a node serving 1M keys, where the frozen objects lie far apart), so a stop counts only what it
    freezes (the oldest generation's objects, len(gc.get_objects(2)): what the collection just promoted or walked)
    and keeps `frozen_estimate`, an upper bound (frozen objects freed by their reference count are not taken off);
    the frozen list is counted at a stop when that bound passes the count bound (a sweep is armed only if the count
    passes it too), when FLOOR_SECONDS have passed since the last count (the floor's measures: a trough measure,
    any cadence finds it), and at a sweep's end; never within COUNT_SECONDS of the last count: the estimate never
    drops what refcounting freed (a compacted log), so with the live log near the bound it passes it again after
    each count, and a count at each such stop would put the O(frozen) count into every collection of
    generation 1 (review of lag10, L2: frozen at 125,000-176,000, 10-20 ms each). Within COUNT_SECONDS of a count
    a stop freezes whatever the estimate says.

    Rules: everything runs inside the collector's callbacks (gc.freeze and gc.unfreeze only move lists; a
    gc.collect there would do nothing), and the log calls there must not switch greenlets (the stderr handler
    raftdzmq.py sets does not). `install` puts the policy first in gc.callbacks, so a GcPauses installed before
    or after times its work within the collection's pause. Collections of generation 0 are not touched, nor one of
    generation 1 with the collector off (CollectorHold.collect_replaced, during a restore). The sweep's bookkeeping
    is CollectorHold's (raftlib/runtime.py), shared with the restores' sweeps: a restore ending while a sweep is
    armed sweeps itself, and any sweep restarts both policies' counts. A CollectorHold that disables the collector
    stops the automatic collections, and with them these freezes."""

    SWEEP_GROWTH = 2
    SWEEP_SLACK = 50_000  # objects: without it a sweep right after start-up (~35,000 frozen) would come soon again
    SWEEP_SECONDS = 300.0  # of a node's life at most between two sweeps (armed at the first stop after)
    COUNT_SECONDS = 10.0  # at least between two counts of the frozen list (each O(frozen)), at the bound's crossings
    FLOOR_SECONDS = 60.0  # between two counts of the frozen list for `frozen_floor` alone (no crossing)

    def __init__(self) -> None:
        self.frozen_floor = self.frozen_estimate = gc.get_freeze_count()
        self.swept_at = self.counted_at = time.monotonic()
        self.sweeps = 0

    def sweep_bound(self) -> int:
        """The frozen count past which a stop arms a sweep."""
        return self.SWEEP_GROWTH * self.frozen_floor + self.SWEEP_SLACK

    def callback(self, phase: str, info: dict) -> None:
        if phase != "stop" or info["generation"] == 0:
            return
        if CollectorHold.unfrozen_for_sweep and info["generation"] == 1:
            return  # everything stays unfrozen until the full collection that sweeps it
        if info["generation"] == 1 and not gc.isenabled():
            return  # the collector held (CollectorHold.collect_replaced): the restore freezes its state at its end
        if CollectorHold.unfrozen_for_sweep:  # this collection walked everything: what survived is the new measure
            self.frozen_floor = self.frozen_estimate = CollectorHold.end_sweep()
            self.swept_at = self.counted_at = time.monotonic()
            self.sweeps += 1
            log.info("swept the frozen objects: %d unreachable collected, %d frozen again", info["collected"],
                     self.frozen_floor)
            return
        survivors = len(gc.get_objects(2))  # what the freeze below would add (what this collection promoted)
        self.frozen_estimate += survivors
        now = time.monotonic()
        overdue = now - self.swept_at >= self.SWEEP_SECONDS
        countable = now - self.counted_at >= self.COUNT_SECONDS
        if not overdue and countable and (self.frozen_estimate > self.sweep_bound()
                                          or now - self.counted_at >= self.FLOOR_SECONDS):
            self.frozen_estimate, self.counted_at = gc.get_freeze_count() + survivors, now
            self.frozen_floor = min(self.frozen_floor, self.frozen_estimate)
        if overdue or (countable and self.frozen_estimate > self.sweep_bound()):  # the estimate just counted
            log.info("%d objects frozen at most (%d at the lowest since the last sweep, %.0f s ago): all unfrozen, "
                     "the next full collection sweeps", self.frozen_estimate, self.frozen_floor,
                     now - self.swept_at)
            CollectorHold.begin_sweep()
        else:
            gc.freeze()

    def install(self) -> None:
        gc.callbacks.insert(0, self.callback)
        atexit.register(self._uninstall_at_exit)

    def uninstall(self) -> None:
        atexit.unregister(self._uninstall_at_exit)
        gc.callbacks.remove(self.callback)

    def _uninstall_at_exit(self) -> None:
        # Out before the interpreter tears itself down: a collection then, on the loop's thread with its greenlet
        # being finalized, ran the callback, whose log line (a sweep armed, as at every stop past SWEEP_SECONDS)
        # raised in logging's threading.current_thread() and printed a traceback at every such node's exit.
        gc.callbacks.remove(self.callback)


def freeze_after_start() -> None:
    """Collect once, then move every object alive now out of the collector's sight (gc.freeze): the modules,
    classes and functions of start-up and the state just restored from disk. They live as long as the process, and
    a collection of the oldest generation walked all of them each time: ~34,000 objects after the imports, ~20-30 ms
    a full collection here, a pause of the whole event loop. Objects frozen are still freed by their reference
    count; only garbage in a cycle among them would stay, and start-up's objects are not garbage."""
    gc.collect()
    gc.freeze()


def watch_gc_from_env() -> GcPauses | None:
    """With $RAFTDZMQ_GC_STATS set to a folder: time every collection and write gc-PID.json there at exit."""
    folder = os.environ.get(STATS_ENV)
    if not folder:
        return None
    pauses = GcPauses()
    pauses.install()

    def write() -> None:
        with open(os.path.join(folder, f"gc-{os.getpid()}.json"), "w") as f:
            json.dump(pauses.as_dict(), f)

    atexit.register(write)
    return pauses
