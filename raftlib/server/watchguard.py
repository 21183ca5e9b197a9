"""WatchGuard: ends this node's watches, and refuses new ones, while it was removed from the cluster or has heard
from no leader for too long (issue 14, review L1; etcd's WithRequireLeader and its monitorLeader).

Why: a watch is served from what this node applied (raftlib.server.watch). A node that was removed, or that is cut
off from the leader, applies nothing more, so its watchers wait for events that will never come here while the
cluster goes on; when they finally move to another node, their position may be older than every member's history
(410 there): a gap the user could not avoid. Ended early, with a reason, they reconnect to another member with
Last-Event-ID while it still holds the events after their position.

Rules:
- `watch_refusal` (pure: the runtime's frozen status and the clock) says why watches are refused, or None:
  * removed: a member told this node it was removed (RaftNode.removed: 410, the same text as every other route
    answers on a removed node), or its own configuration leaves it out and that configuration is applied (it
    applied its own removal: 410 too);
  * no leader: this node has heard from no leader (a follower: no message from its leader; a leader: it drove
    the node while leading, which check-quorum ends within an election timeout of losing a majority) for
    LEADERLESS_ELECTION_TIMEOUTS election timeouts (503). Three, as etcd: an election normally ends within one or
    two (a randomized timeout of one to two, plus a split vote's retry), which must not cut every watcher of the
    cluster, and three still bound a stranded watcher to about a second (300 ms elections by default). A
    follower that knows a leader serves watches as ever, however far behind it applies.
- WatchGuard.run checks every election timeout / CHECKS_PER_ELECTION_TIMEOUT, and turns the hub's refusal on
  (WatchHub.refuse: every registered watcher wakes and ends with the reason) or off (WatchHub.admit). A stream
  thus ends within the bound plus one check. The time the guard started counts as contact: a node just started
  is given the full bound to find its leader.
- A check that comes more than an election timeout late (this process was stopped, SIGSTOP, or the loop stalled)
  counts as contact too: what the node knew of its leader before the stall says nothing of now, and the runtime
  hears from the leader within a heartbeat once it runs again.
- Every wait is bounded (a sleep of one check period); the guard holds nothing but the hub it drives; `stop`
  kills its greenlet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent

from raftlib.runtime import RuntimeStatus

from .routes_shared import removed_text
from .watch import WatchHub

log = logging.getLogger("raftdzmq.watch")

LEADERLESS_ELECTION_TIMEOUTS = 3  # etcd's monitorLeader: 3 election timeouts without a leader end the watches
CHECKS_PER_ELECTION_TIMEOUT = 3
MIN_CHECK_SECONDS = 0.02


def watch_refusal(status: RuntimeStatus, now: float, contact_floor: float) -> tuple[int, str] | None:
    """(HTTP status, one-line reason) while this node must not serve watches, else None (the module's rules).
    `contact_floor`: a time.monotonic() that counts as contact with a leader (the guard's start, a stall's end)."""
    node = status.node
    removed = removed_text(node.removed)
    if removed:
        return 410, removed
    membership = node.membership
    if membership.node_ids and node.node_id not in membership.node_ids and node.last_applied >= node.membership_index:
        return 410, "this node was removed from the cluster (it applied a configuration that leaves it out)"
    contact = max(status.leader_contact_at, contact_floor)
    bound = LEADERLESS_ELECTION_TIMEOUTS * status.election_timeout_seconds
    if now - contact > bound:
        return 503, (f"this node has heard from no leader for over {bound:g}s ({LEADERLESS_ELECTION_TIMEOUTS} "
                     "election timeouts): it sees no new change; watch through another node")
    return None


class WatchGuard:
    """Drives `hub`'s refusal from `status` (the runtime's), every check period (the module's rules)."""

    def __init__(self, status: Callable[[], RuntimeStatus], hub: WatchHub) -> None:
        self.status, self.hub = status, hub
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self.run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def run(self) -> None:
        contact_floor = last_check = time.monotonic()
        while True:
            election_timeout = self.status().election_timeout_seconds
            gevent.sleep(max(MIN_CHECK_SECONDS, election_timeout / CHECKS_PER_ELECTION_TIMEOUT))
            now = time.monotonic()
            if now - last_check > election_timeout + election_timeout / CHECKS_PER_ELECTION_TIMEOUT:
                contact_floor = now  # stopped or stalled: the node's last contact says nothing of now
            last_check = now
            self.check(now, contact_floor)

    def check(self, now: float, contact_floor: float) -> None:
        refusal = watch_refusal(self.status(), now, contact_floor)
        hub = self.hub
        if refusal is not None and hub.refusal is None:
            log.warning("ending this node's watches and refusing new ones: %s", refusal[1])
            hub.refuse(*refusal)
        elif refusal is None and hub.refusal is not None:
            log.info("serving watches again: a leader was heard")
            hub.admit()
        elif refusal is not None and refusal[0] != hub.refusal[0]:  # type: ignore[index]
            hub.refuse(*refusal)  # no leader, then removed: the newer reason
