"""A deterministic simulated cluster of RaftNodes, and the safety checks run after every step.

One `random.Random(seed)` drives everything: node rngs, message delays, drops, duplicates and reorders,
partitions, crashes (a node keeps only what it saved, and may die between save, send and apply), membership
changes, leadership transfers, snapshots and the client workload. Time is an integer number of ticks; the
network is a heap of (deliver_at, sequence, message). Every message crosses `codec.encode`/`codec.decode`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # `python tests/simulator.py` from the project root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import heapq
import random
from dataclasses import dataclass, field

from raftlib import (
    ConfChange,
    ConfChangeKind,
    Config,
    Entry,
    EntryKind,
    HardState,
    MemoryStorage,
    Member,
    Membership,
    NotLeader,
    ProposalDropped,
    RaftNode,
    Role,
)
from raftlib import codec


class SafetyViolation(AssertionError):
    pass


class KV:
    """The simulated state machine: key -> (value, index of the write that set it)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[str, int]] = {}
        self.applied_index = 0

    def apply(self, entry: Entry) -> None:
        if entry.kind is EntryKind.COMMAND:
            key, value = entry.data.decode().split("=", 1)
            self.data[key] = (value, entry.index)
        self.applied_index = entry.index

    def snapshot_bytes(self) -> bytes:
        return repr(sorted(self.data.items())).encode()

    def restore(self, data: bytes, index: int) -> None:
        import ast

        self.data = dict(ast.literal_eval(data.decode())) if data else {}
        self.applied_index = index


@dataclass
class SimNode:
    node_id: str
    storage: MemoryStorage
    node: RaftNode | None = None
    kv: KV = field(default_factory=KV)
    alive: bool = True
    paused: bool = False
    missed_ticks: int = 0  # while paused; a resumed node catches up on them first, as the runtime's clock does


@dataclass
class PendingWrite:
    key: str
    value: str
    node_id: str
    index: int
    term: int
    start: int


@dataclass
class PendingRead:
    request_id: int
    key: str
    node_id: str
    start: int
    min_write_index: int  # the index of the newest write to `key` acknowledged before this read began
    read_index: int | None = None


class Cluster:
    def __init__(
        self,
        seed: int,
        n: int = 3,
        spares: int = 0,
        config_overrides: dict | None = None,
        codec_roundtrip: bool = True,
        drop_rate: float = 0.0,
        dup_rate: float = 0.0,
        max_delay: int = 2,
        election_ticks: int = 10,
        heartbeat_ticks: int = 2,
        lease_share: float = 0.5,
    ) -> None:
        self.seed = seed
        self.lease_share = lease_share  # of the client reads, the share asked for with a lease
        self.size = n
        self.rng = random.Random(seed)
        self.now = 0
        self.codec_roundtrip = codec_roundtrip
        self.drop_rate, self.dup_rate, self.max_delay = drop_rate, dup_rate, max_delay
        self.config_overrides = dict(config_overrides or {})
        self.election_ticks, self.heartbeat_ticks = election_ticks, heartbeat_ticks
        self.ids = [f"n{i}" for i in range(1, n + spares + 1)]
        voters = tuple(self.ids[:n])
        self.initial = Membership(voters=voters, members=tuple(Member(v, f"raft-{v}", f"http-{v}") for v in voters))
        self.nodes: dict[str, SimNode] = {}
        for node_id in self.ids:
            storage = MemoryStorage()
            if node_id in voters:  # bootstrap: every initial voter starts with the same first entry
                storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", self.initial)])
            self.nodes[node_id] = SimNode(node_id, storage)
            self._start(node_id)
        self.network: list = []
        self._seq = 0
        self.cut: set[tuple[str, str]] = set()  # directed links that drop everything
        self.deliver_filter = None  # optional callable(message) -> message or None, for scripted scenarios
        self.trace: list[str] = []
        self.leaders_by_term: dict[int, str] = {}
        self.applied: dict[int, tuple[int, int, bytes]] = {}  # index -> (term, kind, data) applied anywhere
        self.acked_writes: list[PendingWrite] = []
        self.pending_writes: dict[str, list[PendingWrite]] = {i: [] for i in self.ids}
        self.pending_reads: dict[str, dict[int, PendingRead]] = {i: {} for i in self.ids}
        self.reads_checked = 0
        self.commit_term: dict[int, int] = {}  # index -> term of the leader that first committed it
        self._leader_commit: dict[str, int] = {}
        self._leaders_checked: set[tuple[str, int]] = set()
        self.next_request_id = 1
        self.next_value = 1
        self.keys = ["a", "b", "c"]

    # ---- node lifecycle ---------------------------------------------------------------------------

    def _config(self, node_id: str) -> Config:
        return Config(
            node_id=node_id,
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            snapshot_chunk_bytes=64,
            **self.config_overrides,
        )

    def _start(self, node_id: str) -> None:
        sn = self.nodes[node_id]
        stored = sn.storage.load()
        sn.node = RaftNode(
            self._config(node_id),
            random.Random(self.rng.randrange(1 << 30)),
            stored.hard_state,
            stored.raft_log(),
            stored.snapshot,
        )
        sn.kv = KV()
        if stored.snapshot is not None:
            sn.kv.restore(stored.snapshot.data, stored.snapshot.last_included_index)
        sn.alive = True
        sn.paused = False
        sn.missed_ticks = 0

    def crash(self, node_id: str) -> None:
        sn = self.nodes[node_id]
        sn.alive = False
        sn.node = None
        if self.rng.random() < 0.5:
            sn.storage.lose_unsynced()  # the kernel had not written the commit index out yet
        self.pending_writes[node_id] = []  # outcome unknown: they may or may not commit
        self.pending_reads[node_id] = {}
        self.log_event(node_id, "crash")

    def restart(self, node_id: str) -> None:
        self._start(node_id)
        self.log_event(node_id, "restart")

    # ---- network ----------------------------------------------------------------------------------

    def send(self, m) -> None:
        if (m.src, m.dst) in self.cut:
            return
        if self.deliver_filter is not None:
            m = self.deliver_filter(m)
            if m is None:
                return
        if self.rng.random() < self.drop_rate:
            return
        copies = 2 if self.rng.random() < self.dup_rate else 1
        for _ in range(copies):
            if self.codec_roundtrip:
                m = codec.decode_batch(codec.encode_batch([m]))[0]
            delay = self.rng.randint(0, self.max_delay)
            self._seq += 1
            heapq.heappush(self.network, (self.now + delay, self._seq, m))

    def isolate(self, node_id: str) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def partition(self, group: list[str]) -> None:
        rest = [i for i in self.ids if i not in group]
        for a in group:
            for b in rest:
                self.cut.add((a, b))
                self.cut.add((b, a))

    def heal(self) -> None:
        self.cut.clear()

    # ---- running ----------------------------------------------------------------------------------

    def log_event(self, node_id: str, event: str) -> None:
        sn = self.nodes[node_id]
        n = sn.node
        if n is not None:
            self.trace.append(
                f"t={self.now} {node_id} {n.role.value} term={n.current_term} commit={n.commit_index} {event}"
            )
        else:
            self.trace.append(f"t={self.now} {node_id} down {event}")
        if len(self.trace) > 400:
            del self.trace[:200]

    def tick(self, crash_rate: float = 0.0) -> None:
        """Advance one tick: tick every live node, deliver what is due, process every Ready."""
        self.now += 1
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if sn.alive and sn.paused:
                sn.missed_ticks += 1
            if sn.alive and not sn.paused:
                role = sn.node.role
                sn.node.tick()
                if sn.node.role is not role:
                    self.log_event(node_id, f"tick -> {sn.node.role.value}")
                self.process(node_id, crash_rate)
        while self.network and self.network[0][0] <= self.now:
            _, _, m = heapq.heappop(self.network)
            sn = self.nodes[m.dst]
            if not sn.alive or sn.paused:
                continue
            role = sn.node.role
            sn.node.step(m)
            if sn.node.role is not role:
                self.log_event(m.dst, f"{type(m).__name__} from {m.src} -> {sn.node.role.value}")
            self.process(m.dst, crash_rate)
        self.check_safety()

    def process(self, node_id: str, crash_rate: float = 0.0) -> None:
        sn = self.nodes[node_id]
        while sn.alive and sn.node.has_ready():
            rd = sn.node.ready()
            if rd is None:
                break
            early, late = rd.split_messages()
            for m in early:  # a leader's appends go out before its own save, as the runtime sends them
                self.send(m)
            if crash_rate and self.rng.random() < crash_rate:
                self.crash(node_id)  # before saving: everything in this Ready is lost (but the early messages)
                return
            sn.storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
            if crash_rate and self.rng.random() < crash_rate:
                self.crash(node_id)  # saved, but nothing else sent, nothing applied
                return
            for m in late:
                self.send(m)
            if rd.snapshot is not None:
                sn.kv.restore(rd.snapshot.data, rd.snapshot.last_included_index)
            for e in rd.committed_entries:
                self._apply(sn, e)
            for request_id, index in rd.read_states:
                r = self.pending_reads[node_id].get(request_id)
                if r is not None:
                    r.read_index = index
            for request_id in rd.failed_reads:
                self.pending_reads[node_id].pop(request_id, None)
            sn.node.advance(rd)
            self._serve_reads(sn)

    def _apply(self, sn: SimNode, e: Entry) -> None:
        seen = self.applied.get(e.index)
        mine = (e.term, int(e.kind), e.data)
        if seen is None:
            self.applied[e.index] = mine
        elif seen != mine:
            self.fail(f"state machine safety: {sn.node_id} applied {mine} at {e.index}, another node applied {seen}")
        if e.index != sn.kv.applied_index + 1:
            self.fail(f"{sn.node_id} applied {e.index} after {sn.kv.applied_index}")
        sn.kv.apply(e)
        still = []
        for w in self.pending_writes[sn.node_id]:
            if w.index == e.index:
                if w.term == e.term:
                    self.acked_writes.append(w)
            elif w.index > e.index:
                still.append(w)
        self.pending_writes[sn.node_id] = still

    def _serve_reads(self, sn: SimNode) -> None:
        reads = self.pending_reads[sn.node_id]
        for request_id in [rid for rid, r in reads.items() if r.read_index is not None]:
            r = reads[request_id]
            if sn.kv.applied_index < r.read_index:
                continue
            del reads[request_id]
            _, write_index = sn.kv.data.get(r.key, (None, 0))
            self.reads_checked += 1
            if write_index < r.min_write_index:
                self.fail(
                    f"linearizability: read of {r.key!r} on {sn.node_id} (started t={r.start}) saw the write at "
                    f"index {write_index}, but the write at {r.min_write_index} was acknowledged before it began"
                )

    # ---- clients ----------------------------------------------------------------------------------

    def leader(self) -> str | None:
        best = None
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if sn.alive and not sn.paused and sn.node.role is Role.LEADER:
                if best is None or sn.node.current_term > self.nodes[best].node.current_term:
                    best = node_id
        return best

    def pause(self, node_id: str) -> None:
        self.nodes[node_id].paused = True
        self.log_event(node_id, "paused")

    def resume(self, node_id: str, catch_up: bool = True) -> None:
        """Like SIGCONT for the real runtime: the node's clock jumps over the time it was stopped. (Without
        `catch_up`, a runtime whose clock stopped with the process: what leases must not run on.)"""
        sn = self.nodes[node_id]
        if not sn.paused:
            return
        sn.paused = False
        if sn.alive and catch_up:
            for _ in range(sn.missed_ticks):
                sn.node.tick()
            self.log_event(node_id, f"resumed after {sn.missed_ticks} ticks -> {sn.node.role.value}")
            self.process(node_id)
        sn.missed_ticks = 0

    def client_write(self, node_id: str, key: str | None = None) -> PendingWrite | None:
        sn = self.nodes[node_id]
        if not sn.alive or sn.paused:
            return None
        key = key or self.rng.choice(self.keys)
        value = f"v{self.next_value}"
        self.next_value += 1
        try:
            index = sn.node.propose(f"{key}={value}".encode())
        except (NotLeader, ProposalDropped):
            return None
        w = PendingWrite(key, value, node_id, index, sn.node.current_term, self.now)
        self.pending_writes[node_id].append(w)
        self.process(node_id)
        return w

    def client_read(self, node_id: str, key: str | None = None, lease: bool | None = None) -> PendingRead | None:
        sn = self.nodes[node_id]
        if not sn.alive or sn.paused:
            return None
        key = key or self.rng.choice(self.keys)
        min_index = max((w.index for w in self.acked_writes if w.key == key), default=0)
        request_id = self.next_request_id
        self.next_request_id += 1
        try:
            sn.node.read_index(request_id, lease=self.rng.random() < self.lease_share if lease is None else lease)
        except NotLeader:
            return None
        r = PendingRead(request_id, key, node_id, self.now, min_index)
        self.pending_reads[node_id][request_id] = r
        self.process(node_id)
        return r

    def take_snapshot(self, node_id: str) -> None:
        sn = self.nodes[node_id]
        n = sn.node
        if not sn.alive or n.last_applied <= n.log.snapshot_index:
            return
        snap = n.create_snapshot(n.last_applied, sn.kv.snapshot_bytes())
        sn.storage.save_snapshot(snap)
        self.log_event(node_id, f"snapshot at {snap.last_included_index}")

    def change_membership(self, kind: ConfChangeKind, node_id: str) -> bool:
        leader = self.leader()
        if leader is None:
            return False
        try:
            index = self.nodes[leader].node.change_membership(
                ConfChange(kind, Member(node_id, f"raft-{node_id}", f"http-{node_id}"))
            )
        except (NotLeader, ProposalDropped, ValueError):
            return False
        self.log_event(leader, f"membership {kind.name} {node_id} at {index}")
        self.process(leader)
        return index is not None

    # ---- checks -----------------------------------------------------------------------------------

    def fail(self, why: str) -> None:
        trace = "\n".join(self.trace[-60:])
        raise SafetyViolation(
            f"{why}\nseed={self.seed} t={self.now}\n--- last events ---\n{trace}\n"
            f"replay: python tests/simulator.py --seed {self.seed} --size {self.size}"
        )

    def check_safety(self) -> None:
        by_index: dict[tuple[int, int], bytes] = {}
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if not sn.alive:
                continue
            n = sn.node
            if n.role is Role.LEADER:
                other = self.leaders_by_term.setdefault(n.current_term, node_id)
                if other != node_id:
                    self.fail(f"election safety: {other} and {node_id} both leaders in term {n.current_term}")
                if (node_id, n.current_term) not in self._leaders_checked:
                    self._leaders_checked.add((node_id, n.current_term))
                    self._check_leader_completeness(node_id)
                if n.commit_index > self._leader_commit.get(node_id, 0):
                    for index in range(max(self._leader_commit.get(node_id, 0), n.log.snapshot_index) + 1,
                                       n.commit_index + 1):
                        self.commit_term.setdefault(index, n.current_term)
                self._leader_commit[node_id] = n.commit_index
            if n.commit_index > n.log.last_index:
                self.fail(f"{node_id} commit {n.commit_index} beyond its log {n.log.last_index}")
        # Log matching, part 1: an (index, term) pair names one entry everywhere.
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if not sn.alive:
                continue
            log = sn.node.log
            for index in range(max(log.first_index, log.last_index - 20), log.last_index + 1):
                e = log.entry(index)
                key = (index, e.term)
                data = e.data if e.membership is None else repr(e.membership).encode()
                if by_index.setdefault(key, data) != data:
                    self.fail(f"log matching: two different entries at index {index} term {e.term}")

    def _check_leader_completeness(self, node_id: str) -> None:
        """§5.4: a leader's log holds every entry committed in an earlier term."""
        n = self.nodes[node_id].node
        for index, committed_in in self.commit_term.items():
            if committed_in >= n.current_term or index <= n.log.snapshot_index:
                continue
            if n.log.term(index) != self.applied.get(index, (n.log.term(index),))[0] or index > n.log.last_index:
                self.fail(f"leader completeness: {node_id} (term {n.current_term}) lacks committed entry {index}")

    def check_log_matching(self) -> None:
        """Log matching, part 2 (§5.3): logs that agree at an index agree on everything before it."""
        live = [self.nodes[i].node for i in self.ids if self.nodes[i].alive]
        for a in live:
            for b in live:
                if a is b:
                    continue
                low = max(a.log.first_index, b.log.first_index)
                high = min(a.log.last_index, b.log.last_index)
                agreed = False
                for index in range(high, low - 1, -1):
                    same = a.log.term(index) == b.log.term(index)
                    if agreed and not same:
                        self.fail(f"log matching: {a.node_id} and {b.node_id} differ at {index} below a match")
                    agreed = agreed or same

    def run(self, ticks: int, **kwargs) -> None:
        for _ in range(ticks):
            self.tick(**kwargs)

    def run_until(self, predicate, max_ticks: int) -> bool:
        for _ in range(max_ticks):
            if predicate():
                return True
            self.tick()
        return predicate()


def random_schedule(
    seed: int, n: int, fault_ticks: int = 300, heal_ticks: int = 600, config_overrides: dict | None = None,
    lease_share: float = 0.5,
) -> Cluster:
    """One seeded run: faults and clients for `fault_ticks`, then heal everything and check liveness."""
    rng = random.Random(seed ^ 0x5EED)
    cluster = Cluster(
        seed,
        n=n,
        config_overrides=config_overrides,
        lease_share=lease_share,
        spares=1,
        drop_rate=rng.choice([0.0, 0.02, 0.1]),
        dup_rate=rng.choice([0.0, 0.02]),
        max_delay=rng.choice([1, 2, 4]),
    )
    r = cluster.rng
    removed: set[str] = set()
    spare = cluster.ids[-1]
    crash_rate = rng.choice([0.0, 0.001, 0.003])
    for _ in range(fault_ticks):
        x = r.random()
        alive = [i for i in cluster.ids if cluster.nodes[i].alive and i not in removed]
        if x < 0.25:
            cluster.client_write(r.choice(alive) if alive else cluster.ids[0])
        elif x < 0.45:
            if alive:
                cluster.client_read(r.choice(alive))
        elif x < 0.46:
            victim = r.choice(cluster.ids)
            if cluster.nodes[victim].alive:
                cluster.crash(victim)
        elif x < 0.48:
            down = [i for i in cluster.ids if not cluster.nodes[i].alive]
            if down:
                cluster.restart(r.choice(down))
        elif x < 0.49:
            leader = cluster.leader()
            if leader:
                cluster.isolate(leader)
                cluster.log_event(leader, "isolated")
        elif x < 0.50:
            group = r.sample(cluster.ids, len(cluster.ids) // 2)
            cluster.partition(group)
        elif x < 0.505:
            a, b = r.sample(cluster.ids, 2)
            cluster.cut.add((a, b))  # asymmetric
        elif x < 0.53:
            cluster.heal()
        elif x < 0.535:
            cluster.take_snapshot(r.choice(cluster.ids))
        elif x < 0.54:
            leader = cluster.leader()
            voters = cluster.nodes[leader].node.membership.voters if leader else ()
            if leader and len(voters) > 1:
                target = r.choice([v for v in voters if v != leader])
                try:
                    cluster.nodes[leader].node.transfer_leadership(target)
                    cluster.log_event(leader, f"transfer to {target}")
                except Exception:
                    pass
        elif x < 0.543:
            cluster.change_membership(ConfChangeKind.ADD_LEARNER, spare)
        elif x < 0.545:
            leader = cluster.leader()
            if leader:
                voters = cluster.nodes[leader].node.membership.voters
                if len(voters) > n:
                    victim = r.choice(voters)
                    if cluster.change_membership(ConfChangeKind.REMOVE, victim):
                        removed.add(victim)
        elif x < 0.55:
            victim = r.choice(cluster.ids)
            if cluster.nodes[victim].paused:
                cluster.resume(victim)
            else:
                cluster.pause(victim)
        cluster.tick(crash_rate=crash_rate)
    # Heal: every link back, every node up, no more faults; a leader must appear and everything converge.
    cluster.heal()
    cluster.drop_rate = cluster.dup_rate = 0.0
    for node_id in cluster.ids:
        sn = cluster.nodes[node_id]
        cluster.resume(node_id)
        if not sn.alive:
            cluster.restart(node_id)
    check_liveness(cluster, heal_ticks)
    return cluster


def check_liveness(cluster: Cluster, heal_ticks: int) -> None:
    def members() -> list[str]:
        leader = cluster.leader()
        if leader is None:
            return []
        return list(cluster.nodes[leader].node.membership.node_ids)

    def converged() -> bool:
        leader = cluster.leader()
        if leader is None:
            return False
        ln = cluster.nodes[leader].node
        if ln.log.term(ln.commit_index) != ln.current_term:
            return False
        return all(cluster.nodes[i].node.last_applied == ln.commit_index for i in members())

    # One write after healing makes the leader commit everything before it.
    deadline = cluster.now + heal_ticks
    wrote = False
    while cluster.now < deadline:
        leader = cluster.leader()
        if leader and not wrote:
            wrote = cluster.client_write(leader) is not None
        if wrote and converged():
            break
        cluster.tick()
    else:
        cluster.fail(f"liveness: no converged leader {heal_ticks} ticks after healing (leader={cluster.leader()})")
    cluster.check_log_matching()
    for w in cluster.acked_writes:
        for node_id in members():
            sn = cluster.nodes[node_id]
            if w.index > sn.node.log.snapshot_index and sn.node.log.term(w.index) != w.term:
                cluster.fail(f"acknowledged write {w} missing on {node_id}")


def main() -> None:
    import argparse
    import time

    p = argparse.ArgumentParser(description="Replay one seeded schedule, or soak many.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="cluster size (default: 3, 5 and 7)")
    p.add_argument("--count", type=int, default=1, help="run seeds seed .. seed+count-1")
    p.add_argument("--trace", action="store_true", help="print the event trace of each run")
    args = p.parse_args()
    started, runs, writes, reads = time.monotonic(), 0, 0, 0
    for seed in range(args.seed, args.seed + args.count):
        for n in (args.size,) if args.size else (3, 5, 7):
            c = random_schedule(seed, n)
            runs, writes, reads = runs + 1, writes + len(c.acked_writes), reads + c.reads_checked
            if args.trace:
                print("\n".join(c.trace))
    print(f"{runs} schedules ok in {time.monotonic() - started:.1f}s: {writes} acknowledged writes, "
          f"{reads} linearizable reads checked")


if __name__ == "__main__":
    main()
