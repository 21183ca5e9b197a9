"""What GET /livez and GET /readyz answer: the checks of a node's health, for a load balancer or a Kubernetes probe
(etcd's /livez and /readyz, rqlite's /readyz).

- Live: the node's event loop is responsive and its runtime still drives the node. A process that is not live
  should be restarted. A loop stopped outright (SIGSTOP, a hung fsync that holds the hub) answers nothing at all:
  the prober's own timeout is the check, and the stall is reported for LOOP_STALL_MEMORY_SECONDS once it ends.
- Ready: the node can serve: it is a member, knows a leader it heard from within an election timeout, has
  applied what it knows to be committed (within MAX_APPLY_LAG_ENTRIES) and its disk is not full. A node that is
  not ready should get no traffic, but is not broken.

Rules:
- Pure: the caller passes the time (time.monotonic()) and the runtime's status (a frozen RuntimeStatus). No Raft
  round, no disk, no clock read here: a probe costs the loop nothing it would notice.
- A check is (name, None) when it passes, (name, reason) when it fails; a reason is one short line.
"""

from __future__ import annotations

import math

from raftlib.runtime import RuntimeStatus

LOOP_STALL_SECONDS = 1.0  # a timer of the loop late by more than this: the loop was stalled
LOOP_STALL_MEMORY_SECONDS = 5.0  # /livez reports a stall this long after it ended
MAX_APPLY_LAG_ENTRIES = 1000  # /readyz: at most this many committed entries not yet applied here

Check = tuple[str, str | None]


class LoopWatch:
    """What the loop-lag probe (metrics.Metrics.watch_hub_lag, a 10 ms timer) saw: when it last woke, and the
    last time it woke more than LOOP_STALL_SECONDS late."""

    def __init__(self, now: float) -> None:
        self.woke_at = now
        self.stall_ended_at = -math.inf
        self.stall_seconds = 0.0

    def note(self, now: float, lag_seconds: float) -> None:
        """The probe woke at `now`, `lag_seconds` later than it asked."""
        self.woke_at = now
        if lag_seconds > LOOP_STALL_SECONDS:
            self.stall_ended_at, self.stall_seconds = now, lag_seconds

    def check(self, now: float) -> str | None:
        """Why the loop is not responsive at `now`, or None. The probe not having woken for over
        LOOP_STALL_SECONDS counts as a stall now: the request asking may be the first thing the loop runs after
        one, before the probe's own late wake-up."""
        silent_seconds = now - self.woke_at
        if silent_seconds > LOOP_STALL_SECONDS:
            return f"event loop stalled: its timers ran {silent_seconds:.1f}s late"
        if now - self.stall_ended_at < LOOP_STALL_MEMORY_SECONDS:
            return (f"event loop stalled: its timers ran {self.stall_seconds:.1f}s late "
                    f"{now - self.stall_ended_at:.1f}s ago")
        return None


def liveness(watch: LoopWatch, now: float, running: bool) -> list[Check]:
    """The checks of GET /livez: the loop (LoopWatch) and the runtime (it stops driving the node when its storage
    fails: the process is on its way out)."""
    return [("loop", watch.check(now)), ("raft", None if running else "the raft runtime has stopped")]


def readiness(status: RuntimeStatus) -> list[Check]:
    """The checks of GET /readyz, in the order their reasons are given."""
    node = status.node
    member = node.removed is None and node.node_id in node.membership.node_ids
    # The leader's commit index, not this node's own: a follower's is at most the last entry it has (§5.3), so
    # while it catches up it applies all it knows to be committed and would look ready (review L1).
    committed = max(node.commit_index, node.leader_commit)
    lag = committed - node.last_applied
    return [
        ("member", None if member else "not a member"),
        ("leader", None if node.leader_active else "no leader"),
        ("disk", "disk full" if status.disk_full else None),
        ("snapshot", "applying: receiving a snapshot from the leader" if node.receiving_snapshot else None),
        ("applied", None if lag <= MAX_APPLY_LAG_ENTRIES else
         f"applying: applied {node.last_applied} of {committed}"),
    ]


def report(what: str, checks: list[Check], verbose: bool) -> tuple[bool, str]:
    """(all passed, the answer's text). Plain: `ok`, or the first failure's reason. Verbose (etcd's ?verbose): a
    line per check, `[+]NAME ok` or `[-]NAME failed: REASON`, then `WHAT ok` or `WHAT check failed`."""
    failures = [reason for _, reason in checks if reason is not None]
    if not verbose:
        return not failures, failures[0] if failures else "ok"
    lines = [f"[+]{name} ok" if reason is None else f"[-]{name} failed: {reason}" for name, reason in checks]
    lines.append(f"{what} check failed" if failures else f"{what} ok")
    return not failures, "\n".join(lines)
