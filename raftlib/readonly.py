"""Linearizable reads: ReadIndex rounds and leader leases (thesis §6.4, §6.4.1; etcd's read_only.go).

Pure bookkeeping: no clock (the tick comes in as an argument) and no messages. The leader (`raftlib.core`) decides
when a round starts and sends the heartbeats and the ReadIndexReply messages this module hands back. Rules:
- A read waits in exactly one place until it is answered (`read_states`: (request_id, read_index)) or failed
  (`failed_reads`): `unstarted` (the leader's next round), `before_commit` (a new leader's first commit in its
  term, §6.4 step 1), a round (a majority's acknowledgement, step 2), `to_forward` and `_forwarded` (a
  follower's, until its leader answers).
- Each place is bounded: `expire` fails what waited `read_timeout_ticks`, and `reset` fails everything when the
  node changes role or leader, the reads answered but not yet taken (`read_states`) too: every read state the
  node takes was confirmed in the term it is in when it takes them (Ready.term), which the runtime hands back
  with the read (a lease keepalive requires its keeper to lead in that term). Only reads of this node (origin `node_id`) are failed; another node's are dropped,
  and that node fails them itself in the same bounded time.
- Rounds are numbered in the order they start (heartbeats take numbers from the same sequence), and released in
  that order: a majority for round r confirms every round up to r.
- A round counts the acknowledgements of the voters of the configuration in force when it is asked, not when
  they came: a voter removed since no longer counts (etcd's read-only quorum does the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol
from dataclasses import dataclass, field

from .messages import Membership

# (origin, request_ids, read_index): the leader's answer to reads another node forwarded (a ReadIndexReply).
ReadAnswer = tuple[str, tuple[int, ...], int]


class _Bits(Protocol):
    def getrandbits(self, k: int, /) -> int: ...


def request_ids(rng: _Bits) -> Iterator[int]:
    """The ids one process gives its reads: consecutive, from a random start in [1, 2**52].

    They must not repeat across the node's restarts. A leader's ReadIndexReply can reach a follower long after it was
    sent (a slow network, a paused leader, a queue): if the restarted follower had numbered its reads from 1 again,
    the old reply would answer a new read of the same id with a read index from before that read began, and the node
    would serve a stale value. With 2**52 starting points and a few thousand reads in flight, a collision across
    incarnations is as likely as a disk returning the wrong block. (etcd's request ids carry a time prefix for the
    same reason.)
    """
    request_id = rng.getrandbits(52)  # random.SystemRandom() in the runtime, random.Random(seed) in tests
    while True:
        request_id += 1
        yield request_id


@dataclass(slots=True)
class ReadRound:
    round_id: int
    read_index: int
    requests: list[tuple[int, str]]  # (request_id, node that asked)
    started_tick: int
    acks: set[str] = field(default_factory=set)


class ReadOnly:
    """The reads one node holds, as leader or follower, and the leases it holds as leader."""

    def __init__(self, node_id: str, read_timeout_ticks: int) -> None:
        self.node_id = node_id
        self.read_timeout_ticks = read_timeout_ticks
        # The node reads these lists directly, for cheap checks on its busiest path; only this class changes them.
        self.read_states: list[tuple[int, int]] = []  # (request_id, read_index): this node may serve them
        self.failed_reads: list[int] = []  # this node's requests that cannot be answered: the caller may retry
        self.unstarted: list[tuple[int, str]] = []
        self.before_commit: list[tuple[int, str, int]] = []  # (request_id, origin, tick)
        self.to_forward: list[int] = []  # sent to the leader at the node's next ready()
        self._round_id = 0
        self._rounds: list[ReadRound] = []
        self._forwarded: dict[int, int] = {}  # request_id -> tick forwarded, in that order
        # Leases (thesis §6.4.1): the tick each heartbeat round was sent, and per voter the newest such tick it
        # acknowledged: it heard from the leader at or after then.
        self._round_sent_tick: dict[int, int] = {}
        self._voter_lease_tick: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """How many reads are held: this node's own, and as leader its followers'."""
        return (len(self.to_forward) + len(self._forwarded) + len(self.unstarted) + len(self.before_commit)
                + sum(len(r.requests) for r in self._rounds))

    def take_results(self) -> tuple[list[tuple[int, int]], list[int]]:
        """(read_states, failed_reads) since the last call."""
        out = self.read_states, self.failed_reads
        self.read_states, self.failed_reads = [], []
        return out

    def answer(self, request_id: int, read_index: int) -> None:
        """Serve `request_id` once `read_index` is applied (a lease read: no round needed)."""
        self.read_states.append((request_id, read_index))

    # ---- the leader's reads -----------------------------------------------------------------------

    def queue(self, request_id: int, origin: str, tick: int, committed_in_term: bool) -> None:
        """A read for the leader: for the next round once an entry of its term is committed, else after that."""
        if committed_in_term:
            self.unstarted.append((request_id, origin))
        else:
            self.before_commit.append((request_id, origin, tick))

    def committed_in_term(self) -> None:
        """The leader committed an entry of its term: it knows the commit index now (§6.4 step 1)."""
        self.unstarted.extend((rid, origin) for rid, origin, _ in self.before_commit)
        self.before_commit = []

    def new_round_id(self) -> int:
        self._round_id += 1
        return self._round_id

    def start_round(self, read_index: int, tick: int) -> ReadRound | None:
        """A round for every read queued since the last one, at `read_index` (§6.4 step 2), acknowledged by this
        node; None when no read waits."""
        if not self.unstarted:
            return None
        rnd = ReadRound(self.new_round_id(), read_index, self.unstarted, tick)
        self.unstarted = []
        rnd.acks.add(self.node_id)
        self._rounds.append(rnd)
        return rnd

    def confirmed(self, rnd: ReadRound, membership: Membership) -> bool:
        """A majority of the voters of `membership` acknowledged the round."""
        return sum(1 for v in membership.voters if v in rnd.acks) >= membership.quorum()

    def sent_round(self, round_id: int, tick: int) -> None:
        """A heartbeat carrying `round_id` went out at `tick`."""
        self._round_sent_tick[round_id] = tick

    def acknowledged(self, node_id: str, round_id: int, membership: Membership) -> list[ReadAnswer]:
        """`node_id` answered the heartbeat of `round_id`: it heard from us at or after that heartbeat was sent.
        Renews its lease and acknowledges every round up to `round_id`; returns the answers to send to other
        nodes for the rounds this confirmed."""
        replies: list[ReadAnswer] = []
        if node_id in membership.voters:
            confirmed = 0
            for rnd in self._rounds:
                if rnd.round_id > round_id:
                    break
                rnd.acks.add(node_id)
                if self.confirmed(rnd, membership):
                    confirmed = rnd.round_id
            if confirmed:
                replies = self.release(confirmed)
        sent = self._round_sent_tick.get(round_id)
        if sent is not None and sent > self._voter_lease_tick.get(node_id, -1):
            self._voter_lease_tick[node_id] = sent
        return replies

    def release(self, up_to_round: int) -> list[ReadAnswer]:
        """A majority confirmed this node was still leader after round `up_to_round` began: its reads, and all
        earlier ones, may be served at their read index. This node's go to `read_states`; the others are
        returned, to be sent."""
        replies: list[ReadAnswer] = []
        while self._rounds and self._rounds[0].round_id <= up_to_round:
            rnd = self._rounds.pop(0)
            forwarded: dict[str, list[int]] = {}
            for request_id, origin in rnd.requests:
                if origin == self.node_id:
                    self.read_states.append((request_id, rnd.read_index))
                else:
                    forwarded.setdefault(origin, []).append(request_id)
            replies.extend((origin, tuple(ids), rnd.read_index) for origin, ids in forwarded.items())
        return replies

    def lease_holds(self, tick: int, membership: Membership, lease_ticks: int) -> bool:
        """Thesis §6.4.1: a majority of the voters (counting this node, now) heard from us within `lease_ticks`
        before `tick`, so none of them votes for another candidate yet. The caller checks the rest (check-quorum
        on, an entry of this term committed, no TimeoutNow sent in it)."""
        heard = sorted((tick if v == self.node_id else self._voter_lease_tick.get(v, -1)
                        for v in membership.voters), reverse=True)
        since = heard[membership.quorum() - 1]
        return since >= 0 and tick < since + lease_ticks

    def forget_old_rounds(self, horizon_tick: int) -> None:
        """Forget when the heartbeats before `horizon_tick` were sent (a lease that old is over anyway), once there
        are many: this map would otherwise grow by one a heartbeat."""
        if len(self._round_sent_tick) > 64:
            self._round_sent_tick = {r: t for r, t in self._round_sent_tick.items() if t >= horizon_tick}

    # ---- a follower's reads -----------------------------------------------------------------------

    def forward(self, request_id: int) -> None:
        self.to_forward.append(request_id)

    def take_to_forward(self, tick: int) -> tuple[int, ...]:
        """The reads to send to the leader now; they wait for its answer from `tick` on."""
        ids = tuple(self.to_forward)
        self.to_forward.clear()
        for request_id in ids:
            self._forwarded[request_id] = tick
        return ids

    def forwarded_answer(self, request_ids: tuple[int, ...], read_index: int) -> None:
        """The leader's answer: serve these at `read_index` (those still waiting; the others failed meanwhile)."""
        forwarded = self._forwarded
        self.read_states.extend((rid, read_index) for rid in request_ids if forwarded.pop(rid, None) is not None)

    # ---- bounds -------------------------------------------------------------------------------------

    def expire(self, tick: int) -> None:
        """Fail the reads that waited read_timeout_ticks. Each list is in arrival order, so only its head is looked
        at when nothing is due."""
        if not (self._forwarded or self.before_commit or self._rounds):
            return
        horizon = tick - self.read_timeout_ticks
        while self._rounds and self._rounds[0].started_tick <= horizon:
            self._fail(self._rounds.pop(0).requests)
        if self.before_commit and self.before_commit[0][2] <= horizon:
            due = [r for r in self.before_commit if r[2] <= horizon]
            self.before_commit = self.before_commit[len(due):]
            self._fail(due)
        forwarded = self._forwarded
        while forwarded:
            request_id, forwarded_tick = next(iter(forwarded.items()))
            if forwarded_tick > horizon:
                break
            del forwarded[request_id]
            self.failed_reads.append(request_id)

    def reset(self) -> None:
        """The node changed role, term or leader: every read it holds fails, and every lease is forgotten."""
        for r in self._rounds:
            self._fail(r.requests)
        self._fail(self.unstarted)
        self._fail(self.before_commit)
        self._rounds, self.unstarted, self.before_commit = [], [], []
        self.failed_reads.extend(request_id for request_id, _ in self.read_states)  # of an older term or role
        self.read_states = []
        self.failed_reads.extend(self.to_forward)
        self.failed_reads.extend(self._forwarded)
        self.to_forward, self._forwarded = [], {}
        self._round_sent_tick, self._voter_lease_tick = {}, {}

    def _fail(self, requests) -> None:
        """Fail this node's own reads among `requests`, tuples that start (request_id, origin)."""
        self.failed_reads.extend(r[0] for r in requests if r[1] == self.node_id)
