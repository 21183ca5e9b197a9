"""Crash points: a test-only way to make this process kill itself at a named point of its storage or runtime path
(FoundationDB's BUGGIFY idea, on our durability path). Off, and free, unless the environment says otherwise.

    RAFTDZMQ_CRASH_POINTS="log.after_write=0.001,snapshot.after_rename=0.2"   # name=probability, comma-separated
    RAFTDZMQ_CRASH_POINTS="*=0.002"                                            # every point
    RAFTDZMQ_CRASH_SEED=7                                                      # optional: a reproducible sequence

A point that fires logs one line naming itself, flushes nothing and sends this process SIGKILL: what is on the
disk at that moment is all a restart will find. Only the fault runs (`tests/faults.py`) set these variables.

The points, in the order a write meets them:
    log.after_write            a log record is written, not yet fsynced
    log.after_fsync            the record is durable; nothing sent or acknowledged yet
    runtime.after_save         a Ready is saved; its messages not yet sent, its entries not yet applied
    snapshot.base_step         a step wrote entries into a snapshot's pre-built base segment (a *.tmp, its group open)
    snapshot.after_base_tail   the commit closed that segment's group and fsynced it; still a *.tmp
    snapshot.after_write       the snapshot's temporary file is written and fsynced, not yet renamed
    snapshot.after_rename      the snapshot file is in place; the new log segment not yet written
    snapshot.after_segment     the new log segment is durable; the old files not yet unlinked
    snapshot.between_unlinks   after each unlink of an old segment or snapshot
"""

from __future__ import annotations

import logging
import os
import random
import signal

ENV_POINTS = "RAFTDZMQ_CRASH_POINTS"
ENV_SEED = "RAFTDZMQ_CRASH_SEED"

logger = logging.getLogger("raftlib.crashpoints")


def _parse(spec: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, probability = item.partition("=")
        try:
            points[name.strip()] = float(probability) if probability else 1.0
        except ValueError:
            raise SystemExit(f"{ENV_POINTS}: bad probability in {item!r}") from None
    return points


_points = _parse(os.environ.get(ENV_POINTS, ""))
_rng = random.Random(os.environ.get(ENV_SEED))
enabled = bool(_points)


def configure(spec: str, seed: int | None = None) -> None:
    """Set the points from a spec like the environment variable's (for tests in this process)."""
    global _points, _rng, enabled
    _points = _parse(spec)
    _rng = random.Random(seed)
    enabled = bool(_points)


def hit(name: str) -> None:
    """Called at the point `name`: with its probability, this process dies here and now (SIGKILL)."""
    if not enabled:
        return
    probability = _points.get(name, _points.get("*", 0.0))
    if probability and _rng.random() < probability:
        logger.warning("crash point %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)
