"""The leader's clock for leases: when each lease of the replicated state (store.KeyValueStore.leases) expires.

Rules:
- Pure: no gevent, socket, file or clock; the caller passes the time (`now`, monotonic seconds) into every call,
  so a test drives it with plain numbers.
- Only the leader keeps deadlines (issue 14: expiry is decided by the leader alone and goes through the log as a
  LEASE_EXPIRE entry; the state machine never reads a clock). `become_leader(term, leases, now)` gives every
  lease the full TTL again from now: a keepalive the previous leader answered at t (before this node's election)
  is then honoured, since now + ttl > t + ttl. A lease may expire later than its TTL, never earlier.
- A lease granted while this node leads gets now + ttl when its grant applies here (`granted`).
- `keepalive(lease_id, arrived_at)`: the caller recorded `arrived_at` when the keepalive arrived and confirmed
  leadership with a read round (ReadIndex, thesis §6.4) before calling; the deadline becomes
  max(deadline, arrived_at + ttl). A leader elected after that round resets every lease to its election + ttl,
  later still. A lease being expired (proposed in a LEASE_EXPIRE) is not kept alive.
- `due(now)` hands out at most `max_batch` leases whose deadline passed, marks them expiring, and the caller
  proposes one LEASE_EXPIRE for them. Once expiring, a lease stays expiring (keepalives refused) for the rest of
  the term unless its entry surely never applies: `expire_failed` puts the leases back only then (the proposal
  refused: NotLeader, ProposalDropped; or its index taken by another leader's entry: EntryLost). A proposal whose
  outcome is unknown (Timeout) is still in this leader's log and may commit at any moment: a keepalive answered
  in between would be followed by the expiry, its keys gone long before its TTL (review of lease, R1). Those go
  to `expire_unknown`: still expiring, handed out again first by the next `due` (the store skips an id already
  gone, so proposing one twice is harmless). A later term of this node starts over (`become_leader`): an older
  term's entry applies before any read round of the new term confirms (its no-op commits it, §5.4.2 and §6.4),
  so a keepalive never sees the lease before that entry applied.
- An id once of unknown outcome stays in doubt for the rest of the term (`in_doubt`; cleared when it leaves the
  state, and by `become_leader` and `step_down`): `expire_failed` on a retry of it puts it back in `unsure`, never
  open. That retry being refused (ProposalDropped during a leadership transfer, DiskFull) says nothing of the first
  entry, still in this leader's log in this term: a transfer brings its target up to date, which commits it
  (review of lease, second round, R1 through the retry path).
- The assumption: each node's monotonic clock runs at the rate of real time within a small bounded drift (the
  clocks need not agree with each other, nor with wall time). A TTL is measured on one node's clock between two
  of its own readings, never across nodes.
- Test-only, never in production: `unsafe_no_reset_on_election=True` breaks the reset on purpose (a new leader
  counts each lease's TTL from when its grant applied on this node, so keepalives other leaders answered count for
  nothing). tests/fault_coord.py's lease check must catch it (RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET=1 on the nodes).
- Cost: deadlines in a heap with lazy deletion (an extended lease leaves its old entry to be skipped), so `due`
  is O(log n) per lease handed out or entry skipped, never a scan of every lease. Bounded: the heap is rebuilt
  from `deadlines` once it holds more than 2 * leases + HEAP_SLACK entries.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

TICK_SECONDS = 0.1  # how often the leader looks for leases past their deadline (raftlib.server.node)
HEAP_SLACK = 1024  # the heap is rebuilt when it holds more than 2 * leases + this many entries


class LeaseKeeper:
    """The deadlines of the leases while this node leads (see the module's rules)."""

    def __init__(self, max_batch: int, unsafe_no_reset_on_election: bool = False) -> None:
        assert max_batch >= 1
        self.max_batch = max_batch
        self.unsafe_no_reset_on_election = unsafe_no_reset_on_election  # the module's rules: tests only
        self._applied_at: dict[int, float] = {}  # only with the unsafe variant: when each grant applied here
        self.term: int | None = None  # the term this node leads in; None while it does not
        self.ttl_seconds: dict[int, int] = {}
        self.deadlines: dict[int, float] = {}
        self.expiring: set[int] = set()
        self.unsure: dict[int, None] = {}  # expiring, their entry's outcome unknown: proposed again (in order)
        self.in_doubt: set[int] = set()  # an expiry of theirs had an unknown outcome in this term (never reopened)
        self._heap: list[tuple[float, int]] = []

    @property
    def leading(self) -> bool:
        return self.term is not None

    def become_leader(self, term: int, leases: Iterable[tuple[int, int]], now: float) -> None:
        """This node leads in `term`: every lease in the state ((id, ttl_seconds) pairs) gets its full TTL from
        now, whatever an earlier term of this node had (another leader may have answered keepalives since)."""
        self.term = term
        self.ttl_seconds = dict(leases)
        self.deadlines = {i: now + ttl for i, ttl in self.ttl_seconds.items()}
        if self.unsafe_no_reset_on_election:
            self.deadlines = {i: self._applied_at.get(i, now) + ttl for i, ttl in self.ttl_seconds.items()}
        self.expiring, self.unsure, self.in_doubt = set(), {}, set()
        self._heap = [(deadline, i) for i, deadline in self.deadlines.items()]
        heapq.heapify(self._heap)

    def step_down(self) -> None:
        self.term = None
        self.ttl_seconds, self.deadlines, self.expiring, self.unsure, self._heap = {}, {}, set(), {}, []
        self.in_doubt = set()

    def granted(self, lease_id: int, ttl_seconds: int, now: float) -> None:
        """A grant applied here: while leading, the lease runs its TTL from now."""
        if self.unsafe_no_reset_on_election:
            self._applied_at[lease_id] = now
        if self.leading:
            self.ttl_seconds[lease_id] = ttl_seconds
            self._set(lease_id, now + ttl_seconds)

    def removed(self, lease_id: int) -> None:
        """A lease left the state (revoked or expired)."""
        self.ttl_seconds.pop(lease_id, None)
        self._applied_at.pop(lease_id, None)
        self.deadlines.pop(lease_id, None)  # its heap entries are skipped as stale
        self.expiring.discard(lease_id)
        self.unsure.pop(lease_id, None)
        self.in_doubt.discard(lease_id)

    def alive(self, lease_id: int) -> bool:
        """Whether this leader keeps the lease (known, not being expired)."""
        return lease_id in self.deadlines and lease_id not in self.expiring

    def keepalive(self, lease_id: int, arrived_at: float) -> bool:
        """Extend the lease to at least arrived_at + its TTL (the module's rules: leadership confirmed after
        `arrived_at`). False when this leader does not keep it alive: unknown, or being expired."""
        if not self.alive(lease_id):
            return False
        deadline = arrived_at + self.ttl_seconds[lease_id]
        if deadline > self.deadlines[lease_id]:
            self._set(lease_id, deadline)
        return True

    def remaining_seconds(self, lease_id: int, now: float) -> float | None:
        """Seconds until the lease's deadline (0 once passed); None when this leader does not keep it."""
        deadline = self.deadlines.get(lease_id)
        return None if deadline is None else max(0.0, deadline - now)

    def due(self, now: float) -> list[int]:
        """Up to max_batch leases to expire, marked expiring: first those whose expiry's outcome is unknown
        (`expire_unknown`), then those whose deadline is at or before `now`, earliest first."""
        out: list[int] = []
        while self.unsure and len(out) < self.max_batch:
            lease_id = next(iter(self.unsure))
            del self.unsure[lease_id]
            out.append(lease_id)
        heap = self._heap
        while heap and heap[0][0] <= now and len(out) < self.max_batch:
            deadline, lease_id = heapq.heappop(heap)
            if self.deadlines.get(lease_id) != deadline or lease_id in self.expiring:
                continue  # stale: extended since, removed, or handed out already
            assert deadline <= now, "never expire a lease before its deadline"
            self.expiring.add(lease_id)
            out.append(lease_id)
        return out

    def expire_unknown(self, lease_ids: Iterable[int]) -> None:
        """The LEASE_EXPIRE for `lease_ids` may still commit (Timeout): they stay expiring (keepalives refused) and
        the next `due` hands them out again (the module's rules)."""
        for lease_id in lease_ids:
            if lease_id in self.expiring:  # else removed since: its entry (or a revoke) applied
                self.unsure[lease_id] = None
                self.in_doubt.add(lease_id)

    def expire_failed(self, lease_ids: Iterable[int]) -> None:
        """The LEASE_EXPIRE for `lease_ids` surely never applies (refused, or its index taken by another entry), or
        applied and left them (its key bound): those still here are due again at once, open to keepalives. Those
        in doubt stay expiring and go back to `unsure`: an earlier entry of this term for them may still commit."""
        for lease_id in lease_ids:
            if lease_id in self.in_doubt:
                assert lease_id in self.expiring, "in doubt until it leaves the state or the term ends"
                self.unsure[lease_id] = None
            elif lease_id in self.expiring:
                self.expiring.discard(lease_id)
                self._set(lease_id, self.deadlines[lease_id])  # passed already: due at the next look

    def _set(self, lease_id: int, deadline: float) -> None:
        self.deadlines[lease_id] = deadline
        heapq.heappush(self._heap, (deadline, lease_id))
        if len(self._heap) > 2 * len(self.deadlines) + HEAP_SLACK:
            self._rebuild()

    def _rebuild(self) -> None:
        """The heap again from `deadlines`, without its stale entries (review of lease, R2: every keepalive pushes
        one, and a lease kept alive for a year left millions). Amortized O(1) per push: at least half the heap
        (and HEAP_SLACK entries) was stale, and the rebuild is O(n)."""
        self._heap = [(deadline, i) for i, deadline in self.deadlines.items() if i not in self.expiring]
        heapq.heapify(self._heap)
