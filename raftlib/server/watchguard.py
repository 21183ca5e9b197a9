"""WatchGuard: ends this node's watches, and refuses new ones, while it was removed from the cluster or has heard
from no leader for too long (issue 14, review L1; etcd's WithRequireLeader and its monitorLeader).

Why: a watch is served from what this node applied (raftlib.server.watch). A node that was removed, or that is cut
off from the leader, applies nothing more, so its watchers wait for events that will never come here while the
cluster goes on; when they finally move to another node, their position may be older than every member's history
(410 there): a gap the user could not avoid. Ended early, with a reason, they reconnect to another member with
Last-Event-ID while it still holds the events after their position.

Rules:
- `watch_refusal` (pure: the runtime's frozen status, the clock, and the guard's GuardMemory) says why watches
  are refused, or None:
  * removed: a member told this node it was removed (RaftNode.removed: 410, the same text as every other route
    answers on a removed node), or it applied its own removal: an applied configuration leaves it out, and an
    applied configuration held it before (`GuardMemory.was_member`; 410 too). Only a removal that is certain
    counts: a node that joins and installs a snapshot taken before its addition applies a configuration that
    leaves it out, before the entry that adds it arrives (review watchend L5). A node restarted after its
    removal has no such memory: a member tells it (RaftNode.removed) at its next pre-vote;
  * no leader: this node has heard from no leader (a follower: no message from its leader; a leader: it drove
    the node while leading, which check-quorum ends within an election timeout of losing a majority) for
    `leaderless_bound_seconds`: LEADERLESS_ELECTION_TIMEOUTS election timeouts, and at least
    MIN_LEADERLESS_SECONDS (503). Three timeouts, as etcd's monitorLeader; at least 3 s, etcd's default wall time
    (3 x its 1 s election timeout): an election normally ends within one or two timeouts, but a split vote after
    a crash retries for one to two more each round, and the bound must not cut every watcher of the cluster for
    that (0.9 s at 300 ms elections was tight: review watchend L3); 3 s still bounds a stranded watcher to a few
    seconds. A follower that knows a leader serves watches as ever, however far behind it applies.
- WatchGuard.run checks every election timeout / CHECKS_PER_ELECTION_TIMEOUT, and turns the hub's refusal on
  (WatchHub.refuse: every registered watcher wakes and ends with the reason) or off (WatchHub.admit). A stream
  thus ends within the bound plus one check. The time the guard started counts as contact: a node just started
  is given the full bound to find its leader.
- A check that comes more than an election timeout late (this process was stopped, SIGSTOP, or the loop stalled)
  counts as contact too: what the node knew of its leader before the stall says nothing of now, and the runtime
  hears from the leader within a heartbeat once it runs again. `remember` (pure) keeps that, and `was_member`,
  from check to check.
- A check that raises (a bug) is logged with its traceback, at most once every ERROR_LOG_SECONDS (the rest are
  counted in the next line), and the guard goes on at its period: it never dies silently with a refusal left set.
  That covers whatever a check or the sleep between raises, a gevent.Timeout (a BaseException) too: everything
  but the GreenletExit of a kill, and the process-wide exits gevent passes to the main greenlet (SystemExit,
  KeyboardInterrupt), which end the process anyway.
- If its greenlet ends all the same (killed by anything but `stop`), that is logged as an error once, and `alive`
  says so: GET /readyz answers 503 `watch guard not running` (raftlib.server.health), so a load balancer takes
  the node's watchers elsewhere. It is not restarted: what ended it is a bug to be seen, not hidden.
- Every wait is bounded (a sleep of one check period); the guard holds nothing but the hub it drives; `stop`
  kills its greenlet.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import gevent

from raftlib.core import NodeStatus
from raftlib.runtime import RuntimeStatus

from .routes_shared import removed_text
from .watch import WatchHub

log = logging.getLogger("raftdzmq.watch")

LEADERLESS_ELECTION_TIMEOUTS = 3  # etcd's monitorLeader: 3 election timeouts without a leader end the watches
MIN_LEADERLESS_SECONDS = 3.0  # etcd's default: 3 x its 1 s election timeout
CHECKS_PER_ELECTION_TIMEOUT = 3
MIN_CHECK_SECONDS = 0.02
ERROR_LOG_SECONDS = 60.0


def check_period_seconds(election_timeout_seconds: float) -> float:
    return max(MIN_CHECK_SECONDS, election_timeout_seconds / CHECKS_PER_ELECTION_TIMEOUT)


def leaderless_bound_seconds(election_timeout_seconds: float) -> float:
    """How long a node may hear from no leader before it refuses watches (the module's rules)."""
    return max(LEADERLESS_ELECTION_TIMEOUTS * election_timeout_seconds, MIN_LEADERLESS_SECONDS)


@dataclasses.dataclass(frozen=True)
class GuardMemory:
    """What the guard keeps from check to check (the module's rules)."""

    last_check: float  # time.monotonic() of the last check (the guard's start before the first)
    contact_floor: float  # a time.monotonic() that counts as contact with a leader: the start, a stall's end
    was_member: bool = False  # an applied configuration held this node: its own removal is certain when applied


def applies_as_member(node: NodeStatus) -> bool:
    """This node is in its configuration and has applied it."""
    return node.node_id in node.membership.node_ids and node.last_applied >= node.membership_index


def remember(memory: GuardMemory, status: RuntimeStatus, now: float) -> GuardMemory:
    """The memory after a check at `now`: a check more than an election timeout late (a stall) counts as contact."""
    election_timeout = status.election_timeout_seconds
    stalled = now - memory.last_check > election_timeout + check_period_seconds(election_timeout)
    return GuardMemory(last_check=now, contact_floor=now if stalled else memory.contact_floor,
                       was_member=memory.was_member or applies_as_member(status.node))


def watch_refusal(status: RuntimeStatus, now: float, memory: GuardMemory) -> tuple[int, str] | None:
    """(HTTP status, one-line reason) while this node must not serve watches, else None (the module's rules)."""
    node = status.node
    removed = removed_text(node.removed)
    if removed:
        return 410, removed
    if (memory.was_member and node.membership.node_ids and node.node_id not in node.membership.node_ids
            and node.last_applied >= node.membership_index):
        return 410, "this node was removed from the cluster (it applied a configuration that leaves it out)"
    contact = max(status.leader_contact_at, memory.contact_floor)
    bound = leaderless_bound_seconds(status.election_timeout_seconds)
    if now - contact > bound:
        return 503, (f"this node has heard from no leader for over {bound:g}s: it sees no new change; "
                     "watch through another node")
    return None


class WatchGuard:
    """Drives `hub`'s refusal from `status` (the runtime's), every check period (the module's rules)."""

    def __init__(self, status: Callable[[], RuntimeStatus], hub: WatchHub) -> None:
        self.status, self.hub = status, hub
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self.run)
        self._greenlet.link(self._ended)

    def stop(self) -> None:
        if self._greenlet is not None:
            greenlet, self._greenlet = self._greenlet, None
            greenlet.kill(block=False)

    def alive(self) -> bool:
        """Started, not stopped, and its greenlet has not ended (the module's rules): GET /readyz asks."""
        return self._greenlet is not None and not self._greenlet.dead

    def _ended(self, greenlet: gevent.Greenlet) -> None:
        why = greenlet.exception or "killed"
        if greenlet is self._greenlet:  # not `stop`'s kill
            log.error("the watch guard has stopped (%r): watches are no longer ended on a removed or leaderless "
                      "node; /readyz says `watch guard not running`", why)

    def run(self) -> None:
        now = time.monotonic()
        memory = GuardMemory(last_check=now, contact_floor=now)
        period = check_period_seconds(0.0)
        errors = 0  # checks that raised since the last one logged
        logged_at = float("-inf")
        while True:
            try:
                gevent.sleep(period)
                status = self.status()
                period = check_period_seconds(status.election_timeout_seconds)
                now = time.monotonic()
                memory = remember(memory, status, now)
                self.check(status, now, memory)
            except (Exception, gevent.Timeout):  # all but a kill's GreenletExit (the module's rules)
                errors += 1
                if time.monotonic() - logged_at >= ERROR_LOG_SECONDS:
                    logged_at = time.monotonic()
                    log.exception("the watch guard's check failed (%d since the last logged); it goes on", errors)
                    errors = 0

    def check(self, status: RuntimeStatus, now: float, memory: GuardMemory) -> None:
        refusal = watch_refusal(status, now, memory)
        hub = self.hub
        if refusal is not None and hub.refusal is None:
            log.warning("ending this node's watches and refusing new ones: %s", refusal[1])
            hub.refuse(*refusal)
        elif refusal is None and hub.refusal is not None:
            log.info("serving watches again: a leader was heard")
            hub.admit()
        elif refusal is not None and refusal[0] != hub.refusal[0]:  # type: ignore[index]
            hub.refuse(*refusal)  # no leader, then removed: the newer reason
