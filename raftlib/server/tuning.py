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
    """Each full collection's survivors frozen (gc.freeze in its stop callback), so the next full collection walks
    only what outlived the young generations since: under writes a leader's full collections walked the Raft log's
    entries again each time (up to ~105,000 `Entry` and the watch history's ~10,000 `Event` of ~117,000 objects,
    90-116 ms at 64 clients: docs/BENCHMARKS.md, "The collector under sustained writes"), each a pause of the
    event loop.

    Frozen objects are still freed by their reference count (a compacted entry, an evicted event); a cycle of
    garbage among them is not: an object alive at a freeze that later dies in a cycle (a request in flight then)
    stays frozen. Bounded as CPython bounds the oldest generation's garbage: once the frozen count exceeds
    SWEEP_GROWTH times its count after the last sweep plus SWEEP_SLACK objects, a full collection's stop
    unfreezes everything instead, so the next full collection (the sweep) walks the whole heap, frees the frozen
    garbage, and sets the new count. Frozen garbage therefore stays under SWEEP_GROWTH times what was alive at the
    last sweep plus the slack. The sweep is one pause of a full collection of the heap, as every full collection
    was before; the rest walk only what was promoted since the last one.

    Rules: everything runs inside the collector's callbacks (gc.freeze and gc.unfreeze only move lists; a
    gc.collect there would do nothing). Collections of the younger generations are not touched. A CollectorHold
    (raftlib/runtime.py) that disables the collector stops the automatic collections, and with them these freezes."""

    SWEEP_GROWTH = 2
    SWEEP_SLACK = 50_000  # objects: without it a sweep right after start-up (~35,000 frozen) would come soon again

    def __init__(self) -> None:
        self.frozen_after_sweep = gc.get_freeze_count()
        self.sweeping = False
        self.sweeps = 0

    def callback(self, phase: str, info: dict) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        if self.sweeping:  # this collection walked everything: what survived is the new measure
            gc.freeze()
            self.sweeping, self.sweeps = False, self.sweeps + 1
            self.frozen_after_sweep = gc.get_freeze_count()
            log.info("swept the objects frozen after full collections: %d unreachable collected, %d frozen again",
                     info["collected"], self.frozen_after_sweep)
        elif gc.get_freeze_count() > self.SWEEP_GROWTH * self.frozen_after_sweep + self.SWEEP_SLACK:
            log.info("%d objects frozen (%d after the last sweep): all unfrozen, the next full collection sweeps",
                     gc.get_freeze_count(), self.frozen_after_sweep)
            gc.unfreeze()
            self.sweeping = True
        else:
            gc.freeze()

    def install(self) -> None:
        gc.callbacks.append(self.callback)

    def uninstall(self) -> None:
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
