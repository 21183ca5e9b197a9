"""What GET /livez and GET /readyz answer: the checks of a node's health, for a load balancer or a Kubernetes probe
(etcd's /livez and /readyz, rqlite's /readyz).

- Live: the node answers, and its runtime still drives the node. A process that is not live should be restarted.
  A node that can answer is live: a loop stopped outright (SIGSTOP, a hung fsync that holds the hub) answers
  nothing at all, and the prober's own timeout is the check. A stall that has ended is no reason to restart a
  node (review L2: every node of a cluster stalls at once while it serialises its snapshot, and /livez failed
  them all for seconds after): stalls are in /metrics only (the hub-lag histogram).
- Ready: the node can serve: it is a member, knows a leader it heard from within an election timeout, its disk
  is not full, its watch guard runs (raftlib.server.watchguard: without it a removed or leaderless node's watchers
  wait for ever; not asked of a node that serves no watches), it receives or restores no snapshot, and it has
  applied what it knows to be committed (within MAX_APPLY_LAG_ENTRIES). A node that is not ready should get no
  traffic, but is not broken (a dead watch guard is a bug: restart the node once the traffic has moved).

Rules:
- Pure: the caller passes the runtime's status (a frozen RuntimeStatus) and the time (time.monotonic()). No Raft
  round, no disk: a probe costs the loop nothing it would notice.
- A check is (name, None) when it passes, (name, reason) when it fails; a reason is one short line.
"""

from __future__ import annotations

from raftlib.core import NodeStatus
from raftlib.runtime import RuntimeStatus

MAX_APPLY_LAG_ENTRIES = 1000  # /readyz: at most this many committed entries not yet applied here
# /readyz, once the checks above pass: a linearizable read (a ReadIndex round through the leader, thesis §6.4) must
# complete within this. The leader_commit a follower knows may be old: frames the leader queued while the follower
# was down (same term, older commit indexes) are the first it reads after a restart, and the node looked ready
# 1,500 entries behind (CI, test_health). The read's index is the leader's commit index NOW.
READY_READ_SECONDS = 0.5

WATCH_GUARD_NOT_RUNNING = "watch guard not running"

Check = tuple[str, str | None]


def liveness(running: bool) -> list[Check]:
    """The checks of GET /livez: the runtime still drives the node (RuntimeStatus.running: false once its loop
    greenlet has died, which only a bug does; a storage failure exits the process and a graceful stop closes
    HTTP first, so neither is ever seen here)."""
    return [("raft", None if running else "the raft runtime has stopped")]


def readiness(status: RuntimeStatus, now: float, watch_guard_running: bool = True) -> list[Check]:
    """The checks of GET /readyz at `now` (time.monotonic()), in the order their reasons are given.
    `watch_guard_running`: the node's WatchGuard runs, or the node serves no watches."""
    node = status.node
    # Both: the core's view as of its last drive, and the runtime's clock now. A node just resumed from SIGSTOP
    # may serve this before its next drive ticks the core past the pause (review L3).
    leader = node.leader_active and now - status.leader_contact_at <= status.election_timeout_seconds
    member = node.removed is None and node.node_id in node.membership.node_ids
    # The leader's commit index, not this node's own: a follower's is at most the last entry it has (§5.3), so
    # while it catches up it applies all it knows to be committed and would look ready (review L1).
    committed = max(node.commit_index, node.leader_commit)
    lag = committed - node.last_applied
    return [
        ("member", None if member else "not a member"),
        ("leader", None if leader else "no leader"),
        ("disk", "disk full" if status.disk_full else None),
        ("watches", None if watch_guard_running else WATCH_GUARD_NOT_RUNNING),
        ("snapshot", snapshot_reason(node)),
        ("applied", None if lag <= MAX_APPLY_LAG_ENTRIES else
         f"applying: applied {node.last_applied} of {committed}"),
    ]


def snapshot_reason(node: NodeStatus) -> str | None:
    """Why a node that receives or restores a snapshot is not ready (None: it does neither)."""
    if node.restoring_snapshot:
        return "applying: restoring a snapshot"
    return "applying: receiving a snapshot from the leader" if node.receiving_snapshot else None


def report(what: str, checks: list[Check], verbose: bool) -> tuple[bool, str]:
    """(all passed, the answer's text). Plain: `ok`, or the first failure's reason. Verbose (etcd's ?verbose): a
    line per check, `[+]NAME ok` or `[-]NAME failed: REASON`, then `WHAT ok` or `WHAT check failed`."""
    failures = [reason for _, reason in checks if reason is not None]
    if not verbose:
        return not failures, failures[0] if failures else "ok"
    lines = [f"[+]{name} ok" if reason is None else f"[-]{name} failed: {reason}" for name, reason in checks]
    lines.append(f"{what} check failed" if failures else f"{what} ok")
    return not failures, "\n".join(lines)
