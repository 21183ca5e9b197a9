"""The leader's lease clock (raftlib.server.leases.LeaseKeeper) with time passed in as numbers, and
raftlib.server.node.LeaderLeases (the keeper in step with the node's role and term, its ticks proposing
LEASE_EXPIRE) against a real store and a fake runtime: issue 14's "never expires before its TTL has passed since
the last keepalive that was answered; a new leader gives every lease its full TTL again"."""

from __future__ import annotations

import ast
import logging
import os

import cbor2
import pytest

from raftlib.core import NotLeader, ProposalDropped
from raftlib.messages import Role
from raftlib.runtime import EntryLost, Timeout
from raftlib.server.leases import LeaseKeeper
from raftlib.server.metrics import Metrics
from raftlib.server.node import LeaderLeases
from raftlib.storage_errors import DiskFull
from raftlib.server.store import (FEATURE_LEVEL, LEASE_EXPIRE, LEASE_GRANT, PUT_WITH_TTL, SET_FEATURE_LEVEL,
                                  SET_WITH_LEASE, Event, KeyValueStore, command)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_becoming_leader_gives_every_lease_its_full_ttl_from_then():
    k = LeaseKeeper(max_batch=10)
    k.become_leader(3, [(7, 10), (9, 4)], now=100.0)
    assert k.deadlines == {7: 110.0, 9: 104.0}
    assert k.due(103.9) == [] and k.due(104.0) == [9]
    k.become_leader(5, [(7, 10), (9, 4)], now=200.0)  # a later term: everything again, the expiring mark too
    assert k.deadlines == {7: 210.0, 9: 204.0} and k.expiring == set() and k.alive(9)
    assert k.due(203.99) == []


def test_a_keepalive_extends_to_its_arrival_plus_ttl_and_never_shortens():
    k = LeaseKeeper(max_batch=10)
    k.become_leader(1, [(7, 10)], now=0.0)
    assert k.keepalive(7, arrived_at=6.0) and k.deadlines[7] == 16.0
    assert k.keepalive(7, arrived_at=5.0) and k.deadlines[7] == 16.0  # an older arrival answered late: no change
    assert k.due(15.99) == [] and k.remaining_seconds(7, 15.0) == 1.0
    assert k.due(16.0) == [7]
    assert not k.keepalive(7, arrived_at=16.0) and not k.alive(7)  # being expired: 404 from then on
    assert not k.keepalive(99, arrived_at=1.0)  # unknown


def test_expiry_comes_in_bounded_batches_earliest_first_and_a_failed_one_is_due_again():
    k = LeaseKeeper(max_batch=2)
    k.become_leader(1, [(i, i) for i in range(1, 6)], now=0.0)
    assert k.due(10.0) == [1, 2] and k.due(10.0) == [3, 4] and k.due(10.0) == [5] and k.due(10.0) == []
    k.expire_failed([3, 4])
    assert k.alive(3) and k.due(10.0) == [3, 4]
    k.removed(3)  # the entry did apply after all (or a revoke did)
    k.expire_failed([3])
    assert 3 not in k.deadlines and k.due(20.0) == []


def test_an_expiry_of_unknown_outcome_stays_expiring_and_is_handed_out_again_first():
    k = LeaseKeeper(max_batch=2)
    k.become_leader(1, [(i, 10) for i in range(1, 6)], now=0.0)
    assert k.due(10.0) == [1, 2]
    k.expire_unknown([1, 2])
    assert not k.alive(1) and not k.keepalive(2, arrived_at=10.0)  # 404 for the rest of the term
    assert k.due(10.0) == [1, 2] and k.due(10.0) == [3, 4]  # again, ahead of the heap
    k.expire_unknown([1, 2])
    k.removed(1)  # an entry for it applied
    assert k.due(10.0) == [2, 5] and k.due(10.0) == []
    k.expire_unknown([2])
    k.become_leader(2, [(2, 10)], now=20.0)  # a later term starts over
    assert k.alive(2) and k.due(29.9) == []


def test_the_heap_stays_bounded_under_keepalives_and_grant_revoke_churn():
    """Review of lease, R2: every keepalive and grant pushes a heap entry; stale ones must not pile up."""
    from raftlib.server.leases import HEAP_SLACK
    k = LeaseKeeper(max_batch=10)
    k.become_leader(1, [(1, 3600), (2, 5)], now=0.0)
    for n in range(20_000):  # one client's keepalive loop
        assert k.keepalive(1, arrived_at=n * 0.001)
    assert len(k._heap) <= 2 * len(k.deadlines) + HEAP_SLACK + 1
    for i in range(3, 20_003):  # grant and revoke, never more than 3 leases alive
        k.granted(i, 3600, now=20.0)
        k.removed(i)
    assert len(k._heap) <= 2 * len(k.deadlines) + HEAP_SLACK + 1
    assert k.due(5.0) == [2] and k.due(3619.99) == [] and k.due(3620.0) == [1]  # what is left is right


def test_grants_count_only_while_leading_and_stepping_down_forgets():
    k = LeaseKeeper(max_batch=10)
    k.granted(4, 5, now=1.0)
    assert k.deadlines == {}
    k.become_leader(2, [], now=1.0)
    k.granted(4, 5, now=3.0)
    assert k.deadlines == {4: 8.0}
    k.step_down()
    assert not k.leading and k.deadlines == {} and k.due(100.0) == []


@pytest.mark.parametrize("seed", range(40))
def test_no_lease_expires_before_ttl_after_an_answered_keepalive(seed):
    """A random schedule of keepalives, elections, ticks and commits: whenever a lease is handed out by `due`, and
    whenever an expiry entry holding it commits, at least its TTL has passed since the last keepalive answered for
    it (and since the keeper's election). Each batch `due` hands out is one entry, refused (`expire_failed`),
    timed out (`expire_unknown`: pending, it may commit later in the term) or committed (every pending entry of
    the term before it first, in log order; the key bound may leave some: `expire_failed`). A retry refused after
    a timeout must not open the lease while the first entry can still commit (review of lease, second round,
    R1); a new term resolves the old term's pending entries before any keepalive (its no-op, §5.4.2, §6.4)."""
    import random
    rng = random.Random(seed)
    k = LeaseKeeper(max_batch=3)
    ttl = {i: rng.randint(1, 5) for i in range(1, 8)}
    now, term = 0.0, 1
    k.become_leader(term, ttl.items(), now)
    floor = {i: now + t for i, t in ttl.items()}  # no expiry before this
    gone: set[int] = set()
    pending: list[list[int]] = []  # this term's timed-out entries, in log order

    def commit(entry: list[int], left: set[int] = frozenset()) -> None:
        for i in entry:
            if i not in gone and i not in left:
                assert now >= floor[i], f"lease {i} expired {floor[i] - now:.2f}s before its TTL"
                gone.add(i)
                k.removed(i)

    def commit_pending(count: int) -> None:
        for entry in pending[:count]:
            commit(entry)
        del pending[:count]

    for _ in range(600):
        now += rng.random() * 0.5
        r = rng.random()
        if r < 0.05:
            i = max(ttl) + 1  # a grant applied: leases keep coming while others expire
            ttl[i] = rng.randint(1, 5)
            floor[i] = now + ttl[i]
            k.granted(i, ttl[i], now)
        elif r < 0.45:
            i = rng.choice([i for i in ttl if i not in gone] or list(ttl))
            arrived_at = now - rng.random() * 0.2
            if k.keepalive(i, arrived_at):
                floor[i] = max(floor[i], arrived_at + ttl[i])
        elif r < 0.5:
            commit_pending(rng.randint(0, len(pending)))  # some of this term's pending entries commit, in order
            pending.clear()  # the rest lost: the new term's no-op settles them before any read round
            term += 1
            k.become_leader(term, [(i, t) for i, t in ttl.items() if i not in gone], now)
        elif r < 0.6:
            commit_pending(rng.randint(1, max(1, len(pending))))
        else:
            due = k.due(now)
            for i in due:
                assert now >= floor[i]
            if not due:
                continue
            outcome = rng.random()
            if outcome < 0.3:
                k.expire_failed(due)  # refused (a transfer, a full disk): this entry never applies
            elif outcome < 0.6:
                pending.append(due)
                k.expire_unknown(due)  # may still commit: no keepalive for them may count from here on
            else:
                commit_pending(len(pending))  # committed: every earlier entry of the term before it
                left = {i for i in due if rng.random() < 0.2}  # the key bound stopped it
                commit(due, left)
                k.expire_failed([i for i in due if i in left])


def test_the_leases_module_is_pure():
    tree = ast.parse(open(os.path.join(ROOT, "raftlib", "server", "leases.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "heapq", "collections"}, imported


# ---- LeaderLeases: the keeper in step with a node ---------------------------------------------------------------


class FakeNode:
    def __init__(self) -> None:
        self.role, self.current_term, self.leader_id = Role.FOLLOWER, 1, None


class FakeRuntime:
    """Applies what is proposed to the store at once, at the next index (a leader of one)."""

    def __init__(self, store: KeyValueStore) -> None:
        self.node, self.store, self.index = FakeNode(), store, 1
        self.fail: bool | Exception = False  # True: NotLeader
        self.proposed: list[list] = []
        self.restoring_snapshot = False

    def propose(self, cmd: bytes, timeout_seconds: float):
        if self.fail:
            raise self.fail if isinstance(self.fail, Exception) else NotLeader(None)
        self.proposed.append(cbor2.loads(cmd))
        self.index += 1
        return self.index, self.store.apply(self.index, cmd)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leader_leases() -> tuple[LeaderLeases, FakeRuntime, Clock, list[Event]]:
    events: list[Event] = []
    store = KeyValueStore(events.append)
    store.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
    runtime, clock = FakeRuntime(store), Clock()
    return LeaderLeases(runtime, store, Metrics(), 1.0, clock=clock), runtime, clock, events


def test_a_follower_proposes_nothing_and_a_new_leader_starts_every_lease_over():
    leases, runtime, clock, events = leader_leases()
    runtime.propose(command(PUT_WITH_TTL, "svc/a", b"up", 10), 1.0)  # applied while following: no deadline
    assert leases.keeper.deadlines == {}
    clock.now += 60
    leases.tick()
    assert runtime.proposed[1:] == [] and leases.current() is None
    runtime.node.role = Role.LEADER
    leases.tick()  # full TTL from the election, however old the grant
    assert leases.keeper.deadlines == {2: clock.now + 10} and runtime.proposed[1:] == []
    clock.now += 9.9
    leases.tick()
    assert "svc/a" in runtime.store.data
    runtime.node.current_term = 2  # lost and won again between two ticks: full TTL again
    leases.tick()
    clock.now += 9.9
    leases.tick()
    assert "svc/a" in runtime.store.data
    clock.now += 0.2
    leases.tick()
    assert runtime.proposed[-1] == [LEASE_EXPIRE, "", b"", [2]] and "svc/a" not in runtime.store.data
    assert events[-1] == Event("expire", "svc/a", None, 3, 2) and leases.keeper.deadlines == {}
    assert leases.metrics.lease_expirations.values == {"committed": 1}


def test_a_grant_on_the_leader_runs_from_its_apply_and_a_failed_expiry_is_retried():
    leases, runtime, clock, _ = leader_leases()
    runtime.node.role = Role.LEADER
    leases.tick()
    index, _ = runtime.propose(command(LEASE_GRANT, "", b"", 5), 1.0)
    assert leases.keeper.deadlines == {index: clock.now + 5}
    clock.now += 5
    runtime.fail = True
    leases.tick()
    assert runtime.store.leases and leases.keeper.alive(index)  # put back: due again
    runtime.fail = False
    leases.tick()
    assert runtime.store.leases == {} and leases.metrics.lease_expirations.values == {"failed": 1, "committed": 1}


class SlowCommitRuntime(FakeRuntime):
    """With `slow`, a proposal is appended but commits only at commit_pending() (a slow follower disk, say): the
    propose times out, its outcome unknown (the reviewer's repro of R1, /tmp/review-lease)."""

    def __init__(self, store: KeyValueStore) -> None:
        super().__init__(store)
        self.pending: list[tuple[int, bytes]] = []
        self.slow = False

    def propose(self, cmd: bytes, timeout_seconds: float):
        if not self.slow:
            return super().propose(cmd, timeout_seconds)
        self.proposed.append(cbor2.loads(cmd))
        self.index += 1
        self.pending.append((self.index, cmd))
        raise Timeout("no answer in 1.0s")

    def commit_pending(self) -> None:
        for index, cmd in self.pending:
            self.store.apply(index, cmd)
        self.pending = []


def test_an_expiry_whose_outcome_is_unknown_keeps_the_lease_expiring_and_is_proposed_again():
    """Review of lease, R1: a LEASE_EXPIRE that timed out may still commit. Were its leases open to keepalives
    again, one answered 200 in between would be followed by the expiry: the key gone at once, not TTL later."""
    store = KeyValueStore()
    store.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
    runtime, clock = SlowCommitRuntime(store), Clock()
    leases = LeaderLeases(runtime, store, Metrics(), 1.0, clock=clock)
    runtime.node.role = Role.LEADER
    leases.tick()
    index, _ = runtime.propose(command(PUT_WITH_TTL, "svc/a", b"up", 10), 1.0)
    clock.now += 10.0  # the client stopped: the deadline passed
    runtime.slow = True
    leases.tick()  # LEASE_EXPIRE proposed; it times out
    assert runtime.proposed[-1] == [LEASE_EXPIRE, "", b"", [index]]
    # What keepalive_lease does after its read round: refused (404), the lease being expired.
    assert not leases.keeper.alive(index) and not leases.current().keepalive(index, clock.now)
    assert leases.metrics.lease_expirations.values == {"unknown": 1}
    clock.now += 0.05
    leases.tick()  # proposed again, the first of the batch, though its deadline is not in the heap any more
    assert runtime.proposed[-2:] == [[LEASE_EXPIRE, "", b"", [index]]] * 2
    runtime.commit_pending()  # both commit: the second finds the id gone and skips it
    assert "svc/a" not in store.data and store.leases == {} and leases.keeper.deadlines == {}
    assert leases.keeper.unsure == {} and leases.keeper.expiring == set()
    runtime.slow = False
    leases.tick()
    assert len(runtime.proposed) == 3  # nothing left to propose


@pytest.mark.parametrize("error", [NotLeader(None), ProposalDropped("busy"), EntryLost("overwritten")])
def test_an_expiry_that_surely_did_not_apply_opens_the_lease_to_keepalives_again(error):
    leases, runtime, clock, _ = leader_leases()
    runtime.node.role = Role.LEADER
    leases.tick()
    index, _ = runtime.propose(command(PUT_WITH_TTL, "svc/a", b"up", 10), 1.0)
    clock.now += 10.0
    runtime.fail = error
    leases.tick()
    assert leases.keeper.alive(index) and leases.keeper.keepalive(index, clock.now)  # extended to now + 10
    runtime.fail = False
    clock.now += 9.9
    leases.tick()
    assert "svc/a" in runtime.store.data and leases.metrics.lease_expirations.values == {"failed": 1}


def test_a_mass_expiry_goes_on_without_the_tick_pause_while_batches_are_full(monkeypatch):
    """Review of lease, R4: 128 leases every 100 ms took 80 s for 100,000. While a batch comes out full the loop
    goes on at once (sleep(0): it yields between entries); once one is not full, it waits a tick again."""
    from raftlib.server import node as node_module
    from raftlib.server.store import MAX_EXPIRE_BATCH
    leases, runtime, clock, _ = leader_leases()
    runtime.node.role = Role.LEADER
    leases.tick()
    count = 2 * MAX_EXPIRE_BATCH + 5
    for i in range(count):
        runtime.propose(command(PUT_WITH_TTL, f"k{i}", b"", 5), 1.0)
    clock.now += 5
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 5:
            leases.stop()

    monkeypatch.setattr(node_module.gevent, "sleep", sleep)
    leases.run()
    assert pauses == [node_module.LEASE_TICK_SECONDS, 0, 0, node_module.LEASE_TICK_SECONDS,
                      node_module.LEASE_TICK_SECONDS]
    assert [len(p[3]) for p in runtime.proposed[count:]] == [MAX_EXPIRE_BATCH, MAX_EXPIRE_BATCH, 5]
    assert runtime.store.leases == {} and runtime.store.data == {}


def test_leases_an_expiry_entry_left_for_its_key_bound_are_proposed_again(monkeypatch):
    from raftlib.server import store as store_module
    monkeypatch.setattr(store_module, "MAX_DELETE_KEYS_PER_ENTRY", 1)
    leases, runtime, clock, _ = leader_leases()
    runtime.node.role = Role.LEADER
    leases.tick()
    for key in ("a", "b"):
        runtime.propose(command(PUT_WITH_TTL, key, b"", 5), 1.0)
    clock.now += 5
    leases.tick()
    assert [p[3] for p in runtime.proposed[-1:]] == [[2, 3]] and list(runtime.store.leases) == [3]
    leases.tick()
    assert runtime.proposed[-1][3] == [3] and runtime.store.leases == {} and runtime.store.data == {}
    assert leases.metrics.lease_expirations.values == {"committed": 2}


@pytest.mark.parametrize("error", [ProposalDropped("leadership transfer in progress"), DiskFull("the disk is full")])
def test_a_retried_expiry_refused_after_a_timeout_keeps_the_lease_expiring(error):
    """Review of lease, second round, R1 (the reviewer's r1b.py): the first LEASE_EXPIRE timed out and is still in
    this leader's log; its retry is refused without a change of term (a leadership transfer, whose target is
    brought up to date, which commits the first; a full disk). Reopened, the lease would take a keepalive (200)
    and then vanish when the first entry commits, its TTL not run."""
    store = KeyValueStore()
    store.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
    runtime, clock = SlowCommitRuntime(store), Clock()
    leases = LeaderLeases(runtime, store, Metrics(), 1.0, clock=clock)
    runtime.node.role = Role.LEADER
    leases.tick()
    index, _ = runtime.propose(command(PUT_WITH_TTL, "svc/a", b"up", 10), 1.0)
    clock.now += 10.0
    runtime.slow = True
    leases.tick()  # appended, timed out: outcome unknown
    runtime.slow, runtime.fail = False, error
    clock.now += 0.1
    leases.tick()  # the retry refused (never appended): says nothing of the first entry
    assert not leases.keeper.alive(index) and not leases.current().keepalive(index, clock.now)
    assert leases.keeper.unsure == {index: None}  # proposed again at the next tick
    assert leases.metrics.lease_expirations.values == {"unknown": 1, "failed": 1}
    runtime.fail = False
    runtime.commit_pending()  # the first entry commits after all
    assert "svc/a" not in store.data and leases.keeper.deadlines == {} and leases.keeper.in_doubt == set()
    leases.tick()
    assert runtime.proposed[1:] == [[LEASE_EXPIRE, "", b"", [index]]]  # only the first: nothing left to propose


def test_doubt_lasts_the_term_and_is_forgotten_on_removal_and_a_new_term():
    k = LeaseKeeper(max_batch=10)
    k.become_leader(1, [(1, 5), (2, 5)], now=0.0)
    assert k.due(5.0) == [1, 2]
    k.expire_unknown([1, 2])
    assert k.due(5.1) == [1, 2]
    k.expire_failed([1, 2])  # the retry refused: still expiring, proposed again first
    assert not k.alive(1) and not k.alive(2) and list(k.unsure) == [1, 2]
    k.removed(1)  # the first entry applied for 1
    assert k.in_doubt == {2}
    k.become_leader(2, [(2, 5)], now=6.0)  # a new term: its no-op settled the old entry before any read round
    assert k.in_doubt == set() and k.alive(2)
    assert k.due(11.0) == [2]
    k.expire_failed([2])  # refused in this term, no unknown outcome in it: open again
    assert k.alive(2) and k.keepalive(2, 11.0)
    assert k.due(11.5) == [] and k.due(16.0) == [2]
    k.expire_unknown([2])
    k.step_down()
    assert k.in_doubt == set()


def test_a_node_elected_while_it_restores_a_snapshot_builds_its_keeper_from_the_snapshots_leases():
    """Final review of this stop, F1: a follower elected while it restored a leader's snapshot a batch per drive
    built its keeper from the OLD lease table at its first tick; after the swap a lease of the snapshot was not in
    the keeper (every keepalive 404, its keys never expired) and a vanished one stayed. The keeper now waits for the
    swap (Runtime.restoring_snapshot)."""
    leases, runtime, clock, _ = leader_leases()
    old = leases.store
    runtime.proposed.clear()
    # The snapshot's state: lease 40 holding lock/a (granted after the old state).
    source = KeyValueStore()
    source.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
    source.apply(40, command(LEASE_GRANT, "", b"", 5))
    source.apply(41, command(SET_WITH_LEASE, "lock/a", b"me", 40))
    assert 40 in source.leases
    steps = old.restoring(source.snapshot())
    runtime.restoring_snapshot = True
    runtime.node.role, runtime.node.current_term = Role.LEADER, 9
    assert leases.current() is None  # not built from the old table
    for replaced in steps:
        if replaced:
            break
    runtime.restoring_snapshot = False
    keeper = leases.current()
    assert keeper is not None and 40 in keeper.deadlines
    assert keeper.keepalive(40, clock())  # a keepalive of the snapshot's lease is answered
    clock.now += 6
    leases.tick()
    assert any(p[0] == LEASE_EXPIRE and 40 in p[3] for p in runtime.proposed), runtime.proposed
    assert old.get("lock/a") is None  # expired after its TTL, not held for ever


def test_an_expiry_refused_tick_after_tick_is_logged_once_every_few_seconds_with_a_count(caplog):
    """Review of uncommitted, 2: a leader that holds -max-uncommitted-bytes (or is transferring) refuses the
    LEASE_EXPIRE of every 0.1 s tick; each refusal is counted in the metrics, and said at most once every
    EXPIRY_REFUSAL_LOG_SECONDS with how many were left unsaid."""
    from raftlib.server.node import EXPIRY_REFUSAL_LOG_SECONDS

    leases, runtime, clock, _ = leader_leases()
    runtime.node.role = Role.LEADER
    leases.tick()
    runtime.propose(command(LEASE_GRANT, "", b"", 1), 1.0)
    clock.now += 1
    runtime.fail = ProposalDropped("the leader holds 70 bytes of entries not yet committed (at most 64)")
    start = clock.now
    with caplog.at_level(logging.INFO, logger="raftdzmq.node"):
        for tick in range(50):  # 5 s of ticks, the first at `start`
            clock.now = start + tick * EXPIRY_REFUSAL_LOG_SECONDS / 50
            leases.tick()
        clock.now = start + EXPIRY_REFUSAL_LOG_SECONDS
        leases.tick()
    said = [r.getMessage() for r in caplog.records if "was not applied" in r.getMessage()]
    assert said == ["the expiry of 1 leases was not applied (the leader holds 70 bytes of entries not yet committed "
                    "(at most 64))",
                    "the expiry of 1 leases was not applied (the leader holds 70 bytes of entries not yet committed "
                    "(at most 64)) (and 49 more expiries not applied since the last such line)"], said
    assert leases.metrics.lease_expirations.values == {"failed": 51}
    runtime.fail = False
    leases.tick()
    assert runtime.store.leases == {}
