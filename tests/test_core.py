"""Named cases for the Raft core, each citing the paper or thesis, driven through the simulated cluster, and
tests that break the core on purpose to show a check can fire (the whole mutation table: test_mutations.py)."""

from __future__ import annotations

import dataclasses
import random
import sys
import types
from collections.abc import Callable

import pytest

from raftlib import (
    AppendEntries,
    AppendEntriesReply,
    ConfChange,
    ConfChangeKind,
    Config,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotReply,
    Member,
    Membership,
    NotLeader,
    ProposalDropped,
    ReadIndexReply,
    ReadIndexRequest,
    Removed,
    RaftLog,
    RaftNode,
    RequestVote,
    RequestVoteReply,
    Role,
    Snapshot,
    TargetRestoring,
    TimeoutNow,
    UncommittedBoundExceeded,
)
from raftlib import codec
from raftlib.messages import BytesSink, SnapshotUnreadable, snapshot_bytes, snapshot_chunk
from raftlib.progress import Progress, ProgressState
from simulator import Cluster, SafetyViolation, figure_8_scenario, self_removal_lease_scenario
import wire_637af74

# No entries kept behind a snapshot's cut (Config.snapshot_catch_up_entries): a follower behind it gets the snapshot,
# which is what the tests of snapshot transfers need of a follower a few entries behind.
NO_CATCH_UP = {"snapshot_catch_up_entries": 0}


def elect(c: Cluster, max_ticks: int = 500) -> str:
    assert c.run_until(lambda: c.leader() is not None, max_ticks), "no leader elected"
    leader = c.leader()
    # Let the no-op of the new term commit (§8).
    n = c.nodes[leader].node
    assert c.run_until(lambda: n.log.term(n.commit_index) == n.current_term, 200)
    return leader


def write(c: Cluster, key: str = "k", ticks: int = 200, value: str | None = None) -> None:
    leader = c.leader()
    w = c.client_write(leader, key, value=value)
    assert w is not None
    assert c.run_until(lambda: w in c.acked_writes, ticks), "write not acknowledged"


def test_import_of_core_pulls_in_no_io():
    import os
    import subprocess

    code = ("import raftlib, raftlib.core, sys; "
            "print(sorted(m for m in ('gevent','zmq','bottle','cbor2','socket','raftdzmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# The pure modules and what each may import: the standard library's pure modules, and the arrows of the layout
# (core -> log, messages, progress, readonly). Checked in the source, so that an import inside a function counts.
PURE_IMPORTS = {
    "messages": set(),
    "log": {"messages"},
    "progress": {"messages"},
    "readonly": {"messages"},
    "core": {"log", "messages", "progress", "readonly"},
    "interfaces": {"log", "messages"},
    "memory_storage": {"interfaces", "messages"},
}
PURE_STDLIB = {"__future__", "collections.abc", "dataclasses", "enum", "types", "typing"}


def test_the_pure_modules_import_only_along_the_layouts_arrows():
    import ast
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "raftlib")
    for module, allowed in PURE_IMPORTS.items():
        with open(os.path.join(root, module + ".py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
                assert names <= PURE_STDLIB, f"raftlib/{module}.py imports {names - PURE_STDLIB}"
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module in PURE_STDLIB, f"raftlib/{module}.py imports {node.module}"
                else:
                    assert node.module in allowed, f"raftlib/{module}.py imports .{node.module}"


def test_one_leader_is_elected_and_replicates():
    """§5.2, §5.3: a leader is elected and its entries reach every node."""
    c = Cluster(seed=1, n=3)
    elect(c)
    for _ in range(5):
        write(c)
    c.run(20)
    leader_log = c.nodes[c.leader()].node.log
    for sn in c.nodes.values():
        assert sn.node.commit_index == leader_log.last_index
        assert [sn.node.log.term(i) for i in range(1, leader_log.last_index + 1)] == [
            leader_log.term(i) for i in range(1, leader_log.last_index + 1)
        ]


def test_follower_refuses_proposals():
    c = Cluster(seed=2, n=3)
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    with pytest.raises(NotLeader) as e:
        c.nodes[follower].node.propose(b"x=1")
    assert e.value.leader_id == leader


def test_figure_7_divergent_follower_logs_are_repaired():
    """§5.3, Figure 7: followers missing entries, with extra entries, or both, end with the leader's log."""
    logs = {
        "n1": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6],  # the leader for term 8
        "n2": [1, 1, 1, 4, 4, 5, 5, 6, 6],  # (a)
        "n3": [1, 1, 1, 4],  # (b)
        "n4": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # (c)
        "n5": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # (d)
        "n6": [1, 1, 1, 4, 4, 4, 4],  # (e)
        "n7": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # (f)
    }
    c = Cluster(seed=3, n=7, election_ticks=10)
    c.preload_logs(logs, current_term=7)
    c.nodes["n1"].node.step(_timeout_now("n1"))  # make n1 the candidate, as in the figure
    c.process("n1")
    leader = elect(c)
    assert leader == "n1"
    write(c)
    c.run(50)
    want = [c.nodes["n1"].node.log.term(i) for i in range(1, c.nodes["n1"].node.log.last_index + 1)]
    assert want[:10] == logs["n1"] and want[10] == 8
    for node_id in logs:
        n = c.nodes[node_id].node
        assert [n.log.term(i) for i in range(1, n.log.last_index + 1)] == want, node_id


def _timeout_now(dst: str, term: int = 7):
    return TimeoutNow("n2", dst, term)


def test_figure_8_an_entry_of_a_previous_term_is_not_committed_by_counting():
    """§5.4.2, Figure 8 (see simulator.figure_8_scenario)."""
    c = figure_8_scenario()
    for node_id in ("n2", "n3", "n4", "n5"):
        assert c.nodes[node_id].node.log.term(2) == 3  # overwritten, and that was safe: it never committed


def test_figure_8_check_fires_when_the_core_counts_previous_term_entries():
    with pytest.raises(SafetyViolation, match="leader completeness|state machine safety"):
        figure_8_scenario("commit_previous_term")


def test_partitioned_node_rejoining_does_not_depose_the_leader():
    """Thesis §9.6: with pre-vote, a node that was cut off (and timed out many times) rejoins quietly."""
    c = Cluster(seed=4, n=3)
    leader = elect(c)
    term = c.nodes[leader].node.current_term
    loner = next(i for i in c.ids if i != leader)
    c.isolate(loner)
    c.run(300)
    assert c.nodes[loner].node.current_term == term  # pre-votes never succeed, so the term never rose
    c.heal()
    c.run(100)
    assert c.leader() == leader and c.nodes[leader].node.current_term == term


def test_without_pre_vote_the_rejoining_node_does_depose_the_leader():
    """The counter-test: the same schedule without pre-vote disrupts the cluster, so the test above can fail."""
    c = Cluster(seed=4, n=3, config_overrides={"pre_vote": False, "check_quorum": False})
    leader = elect(c)
    term = c.nodes[leader].node.current_term
    loner = next(i for i in c.ids if i != leader)
    c.isolate(loner)
    c.run(300)
    assert c.nodes[loner].node.current_term > term + 5
    c.heal()
    c.run(100)
    assert c.nodes[c.leader()].node.current_term > term


def test_leader_without_a_majority_steps_down_within_an_election_timeout():
    """Thesis §6.2 (check-quorum)."""
    c = Cluster(seed=5, n=3)
    leader = elect(c)
    c.isolate(leader)
    c.run(2 * c.election_ticks + 1)
    assert c.nodes[leader].node.role is not Role.LEADER


def _lone_voter(node_id: str, bootstrapped: bool, seed: int, voters: tuple[str, ...] | None = None,
                **config) -> RaftNode:
    """A node whose log is a bootstrap's (index 1: a configuration of `voters`, by default itself alone), as
    raftlib.server.nodestart writes it: term 1, no vote."""
    first = Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership(voters or (node_id,)))
    return RaftNode(Config(node_id, election_ticks=10, **config), random.Random(seed), HardState(1, None, 1),
                    RaftLog(entries=(first,)),
                    bootstrapped=bootstrapped)


def _ticks_to_lead(node: RaftNode, most: int = 100) -> int:
    """Ticks until the node leads (each Ready saved at once, as a lone node's runtime does), at most `most`."""
    for ticks in range(1, most + 1):
        node.tick()
        rd = node.ready()
        if rd:
            node.advance(rd)
        if node.role is Role.LEADER:
            return ticks
    raise AssertionError(f"{node.node_id} did not lead within {most} ticks")


@pytest.mark.parametrize("pre_vote, check_quorum", [(True, True), (False, True), (True, False), (False, False)])
def test_a_bootstrapped_lone_voter_leads_at_its_first_tick(pre_vote, check_quorum):
    """A new cluster's first node (the README's first command) need not wait an election timeout for its first
    write: it has heard from no one, so no leader's lease counts on its vote (thesis §6.4.1), and its own vote
    elects it. Through pre-vote (granted by itself) and the vote in the same tick; check-quorum keeps it leading
    (its own activity is a majority). A node that restarts is not bootstrapped: the next test."""
    node = _lone_voter("a", True, 1, pre_vote=pre_vote, check_quorum=check_quorum)
    assert _ticks_to_lead(node) == 1
    assert (node.current_term, node.voted_for) == (2, "a")
    assert node.propose(b"x") == 3  # the no-op of term 2 is index 2
    for _ in range(50):  # five election timeouts: check-quorum's windows pass
        node.tick()
        rd = node.ready()
        if rd:
            node.advance(rd)
    assert node.role is Role.LEADER and node.current_term == 2 and node.commit_index == 3


def test_a_restarted_lone_voter_campaigns_after_exactly_one_election_timeout():
    """Not bootstrapped (a restart: it may have answered a leader's heartbeat just before, a leader that removed
    itself from a configuration of the two and whose lease counts on this node's vote), the lone voter waits a
    whole election timeout, as it refuses others' votes that long (_take_term). Not more: with one voter there is
    no vote to split, so the timeout is not randomized up to twice (it was, whatever the seed: 10-19 ticks)."""
    assert {_ticks_to_lead(_lone_voter("a", False, seed)) for seed in range(30)} == {10}


def test_bootstrapped_is_ignored_by_a_node_that_is_not_the_only_voter():
    """`bootstrapped` speeds up only an election that one vote decides: with two voters the first node waits its
    randomized timeout as every voter does (else it would campaign at once on every start of a cluster's nodes)."""
    for seed in range(30):
        node = _lone_voter("a", True, seed, voters=("a", "b"))
        for tick in range(1, 21):
            node.tick()
            if node.role is not Role.FOLLOWER:
                break
        assert 10 <= tick < 20 and node.role is Role.PRE_CANDIDATE, (seed, tick, node.role)


def test_a_self_removed_leaders_lease_runs_out_before_its_restarted_lone_successor_leads():
    """Review rv3, T1: why a restart is not `bootstrapped`, in the case where it matters (simulator.
    self_removal_lease_scenario): leader A of {A, B} removes itself, B saves {B} but its answers are lost, so A
    goes on leading on its lease; B restarts as the only voter. B waits one election timeout, the promise behind
    A's lease (4/5 of one), and A's lease reads all come before B's first write: none is stale."""
    for seed in range(20):
        c = self_removal_lease_scenario(seed)
        assert c.stats["lease reads the removed leader answered"] > 0, seed  # A's lease was in force after B's restart
        assert c.stats["ticks from the restart to B's lead"] == c.election_ticks, seed
        assert any(w.node_id != c.writes[0].node_id for w in c.acked_writes), seed  # B committed a write


def test_a_restarted_lone_voter_taken_as_bootstrapped_lets_the_self_removed_leader_read_stale():
    """The counter-test: the same scenario with every start bootstrapped (the mutation bootstrapped_on_restart, as
    a server that passed the flag on a restart): B leads at its first tick, commits a write alone, and A answers a
    lease read without it."""
    with pytest.raises(SafetyViolation, match="linearizability"):
        self_removal_lease_scenario(0, "bootstrapped_on_restart")


def test_leader_removed_from_the_configuration_steps_down():
    """Thesis §4.2.2: the leader replicates its own removal, steps down once it commits, and never campaigns."""
    c = Cluster(seed=6, n=3)
    leader = elect(c)
    assert c.change_membership(ConfChangeKind.REMOVE, leader)
    index = c.nodes[leader].node.log.last_index
    assert c.run_until(lambda: c.leader() not in (None, leader), 300)
    new = c.leader()
    assert leader not in c.nodes[new].node.membership.voters
    write(c)
    c.run(300)
    assert c.nodes[leader].node.role is Role.FOLLOWER
    assert c.leader() == new
    assert c.nodes[leader].node.removed == (leader, index)  # it knows why it is idle


def test_a_leader_of_two_that_removed_itself_and_went_down_before_the_other_heard_does_not_stall_the_cluster():
    """Found by CI at 1f04b16 (random schedule 478, size 3, once the simulator's random removals could take out a
    leader of two voters): leader A of {A, B} appends its own removal, cut off from B, and goes down. A's log is
    longer, so B, still in {A, B}, can never win A's vote; A, whose configuration in force ({B}) leaves it out,
    never campaigned: no leader ever again. A voter of the configuration before one that leaves it out and is not
    committed may campaign (RaftNode._promotable): A leads, commits its removal through B, and hands over; B then
    leads {B} and takes writes."""
    for seed in range(10):
        _leader_of_two_removed_and_down(seed, stale_notice=False)


def test_a_stale_removed_notice_does_not_stall_a_leader_of_two_that_removed_itself():
    """Review rmv, L1: the same, and a Removed notice of an older removal of A (index 1, delivered late, as held
    links deliver backlogs) reaches A after its restart: it names a configuration older than A's, so A still
    campaigns and the cluster recovers (trusting any notice, A stayed quiet and the stall came back: 10 of 10)."""
    for seed in range(10):
        _leader_of_two_removed_and_down(seed, stale_notice=True)


def _leader_of_two_removed_and_down(seed: int, stale_notice: bool) -> None:
    c = Cluster(seed=seed, n=2)
    c.power_failure_share = 0.0  # the removal stays on A's disk through its crash (a kill, not a power cut)
    a = elect(c)
    b = next(i for i in c.ids if i != a)
    write(c)
    c.isolate(a)
    assert c.change_membership(ConfChangeKind.REMOVE, a)
    removal = c.nodes[a].node.log.last_index
    c.run(2)
    c.crash(a)
    c.heal()
    c.restart(a)
    assert c.nodes[a].node.log.last_index == removal and c.nodes[a].node.membership.voters == (b,), seed
    assert c.nodes[b].node.log.last_index < removal, seed  # B never heard of it
    if stale_notice:
        na = c.nodes[a].node
        na.step(Removed(b, a, max(na.current_term - 1, 0), 1, b))
        c.process(a)
        assert na.removed is not None, seed  # it heard the notice
    assert c.run_until(lambda: c.leader() == b and c.nodes[b].node.membership.voters == (b,), 3000), seed
    write(c, key=f"after-{seed}")


def test_learner_joins_catches_up_and_is_promoted():
    """Thesis §4.2.1: a new server joins as a non-voting learner and becomes a voter once caught up."""
    c = Cluster(seed=7, n=3, spares=1)
    leader = elect(c)
    for _ in range(10):
        write(c)
    assert c.change_membership(ConfChangeKind.ADD_LEARNER, "n4")
    assert c.run_until(lambda: "n4" in c.nodes[c.leader()].node.membership.voters, 500)
    c.run(20)
    assert c.nodes["n4"].kv.data == c.nodes[leader].kv.data


def test_transfer_to_a_node_that_is_behind():
    """Thesis §3.10: the leader brings the target up to date, then it wins an election at once."""
    c = Cluster(seed=8, n=3)
    leader = elect(c)
    target = next(i for i in c.ids if i != leader)
    c.cut.add((leader, target))
    for _ in range(5):
        write(c)
    c.heal()
    c.nodes[leader].node.transfer_leadership(target)
    with pytest.raises(ProposalDropped):
        c.nodes[leader].node.propose(b"k=during-transfer")
    assert c.run_until(lambda: c.leader() == target, 100)
    tn = c.nodes[target].node
    assert tn.log.last_index >= c.nodes[leader].node.commit_index


def test_a_deposed_leader_never_serves_a_read():
    """Thesis §6.4: a read needs a majority to confirm leadership after it arrives; an isolated leader can't."""
    c = Cluster(seed=9, n=3)
    old = elect(c)
    write(c, "k")
    c.isolate(old)
    r = c.client_read(old, "k", lease=False)  # (a lease read would be served: the lease was still valid)
    assert r is not None
    assert c.run_until(lambda: c.leader() not in (None, old), 500)
    write(c, "k")  # the new value, acknowledged by the new leader
    c.run(100)
    assert r.read_index is None  # never released; the read failed when the old leader stepped down
    assert r.request_id not in c.pending_reads[old]


def test_follower_read_waits_for_its_own_apply():
    """Thesis §6.4: a follower gets the read index from the leader and serves after applying that far."""
    c = Cluster(seed=10, n=3)
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    write(c, "k")
    r = c.client_read(follower, "k")
    before = c.reads_checked
    assert c.run_until(lambda: c.reads_checked > before, 100)
    assert r.read_index is not None and r.read_index >= c.nodes[leader].node.commit_index - 1


def test_far_behind_follower_catches_up_through_a_chunked_snapshot():
    """§7: once the leader compacted the entries a follower needs, it sends its snapshot, here in 64-byte chunks."""
    c = Cluster(seed=11, n=3, drop_rate=0.05, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    for k in range(30):
        write(c, f"key{k % 7}", ticks=500)
    c.take_snapshot(leader)
    assert c.nodes[leader].node.log.snapshot_index > 10
    c.restart(lagger)
    assert c.run_until(lambda: c.nodes[lagger].kv.data == c.nodes[c.leader()].kv.data, 1000)
    assert c.nodes[lagger].node.log.snapshot_index > 10


def _batches_sent_to_a_follower_catching_up(writes: int, value: str) -> list[tuple[Entry, ...]]:
    """The entries of each append that a follower is sent, from its crash while `writes` writes of `value` go in
    (none compacted) until it has caught up by them (those sent while it was down included)."""
    c = Cluster(seed=13, n=3)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    sent = _record_sent_to(c, lagger)
    for k in range(writes):
        assert c.client_write(leader, f"key{k}", value=value) is not None
    assert c.run_until(lambda: c.nodes[leader].node.commit_index >= writes, 2000)
    c.restart(lagger)
    assert c.run_until(lambda: c.nodes[lagger].node.log.last_index == c.nodes[leader].node.log.last_index, 2000)
    return [m.entries for m in sent if m.entries]


def test_a_follower_far_behind_is_sent_batches_of_at_most_max_batch_bytes():
    """Issue 13 (restore10): a follower catching up decodes each append and saves its entries in one turn of its
    loop, so a batch bounds how long its heartbeats wait: 1 MiB of 100-byte writes held a joiner 20-45 ms. By
    default a batch holds at most 256 KiB of entries (Entry.size), at least one."""
    batches = [sum(e.size() for e in entries) for entries in _batches_sent_to_a_follower_catching_up(1200, "v" * 1000)]
    assert sum(batches) > 1 << 20
    assert max(batches) <= Config.max_batch_bytes == 256 << 10, max(batches)


def test_a_follower_far_behind_is_sent_batches_of_at_most_max_batch_entries():
    """Review of restore10, L3: decoding and saving cost by the entry more than by the byte, and 256 KiB of the
    smallest writes are 8,738 entries (~17 ms held). By default a batch holds at most 2,048 entries."""
    batches = [len(entries) for entries in _batches_sent_to_a_follower_catching_up(5000, "")]
    assert sum(batches) >= 5000
    assert max(batches) == Config.max_batch_entries == 2048, max(batches)


def _lease_read_on_a_leader_paused_through_an_election(catch_up: bool):
    """Thesis §6.4.1: a leader answers lease reads without a round while a majority heard from it within the lease.
    Its old leader is paused while the others elect a new one and commit a write; then, resumed, it is asked for a
    lease read at once. With its clock caught up (as the runtime's monotonic clock does) the lease has expired."""
    c = Cluster(seed=5, n=3)
    old = elect(c)
    write(c, "k")
    c.run(3)
    r = c.client_read(old, "k", lease=True)
    assert r is not None and r.read_index is not None and r not in c.pending_reads[old].values()  # served at once
    c.pause(old)
    assert c.run_until(lambda: c.leader() not in (None, old), 500)
    new = c.leader()
    n = c.nodes[new].node
    assert c.run_until(lambda: n.log.term(n.commit_index) == n.current_term, 200)
    write(c, "k")
    c.resume(old, catch_up=catch_up, backlog=False)  # the read comes before the messages that waited
    return c, old, c.client_read(old, "k", lease=True)


def test_lease_read_on_a_resumed_old_leader_is_never_stale():
    c, old, r = _lease_read_on_a_leader_paused_through_an_election(catch_up=True)
    # The lease has expired (the leader has stepped down, or will at its next round): no answer from its memory.
    assert r is None or r.read_index is None
    c.run(200)
    assert c.reads_checked >= 1


def test_lease_read_with_a_stopped_clock_is_caught():
    """The clock assumption made visible: a runtime whose clock stopped while the process was paused would serve
    the old value, and the simulator's linearizability check catches it."""
    with pytest.raises(SafetyViolation, match="linearizability"):
        _lease_read_on_a_leader_paused_through_an_election(catch_up=False)


def test_a_cluster_stalled_longer_than_two_election_timeouts_keeps_its_leader_and_its_leases_run_out():
    """Issue 13, CPU starvation: every process of the cluster stalls at once for 2.5 election timeouts, the
    followers' answers to the last heartbeat waiting for the leader and the leader's next heartbeat for them. Each
    resumes with its clock caught up (the runtime's monotonic clock), steps what waited, and only then do its timers
    judge, once: the leader keeps its majority (ticking first crossed two check-quorum boundaries, the second
    finding nothing stepped since the first), the followers keep their leader (no pre-vote). The lease has run out
    all the same (§6.4.1: it counts from when the acknowledged heartbeat was sent): no lease read from memory."""
    c = Cluster(seed=5, n=3)
    leader = elect(c)
    write(c, "k")
    c.run(3)
    n = c.nodes[leader].node
    term = n.current_term
    followers = [f for f in c.ids if f != leader]
    c.pause(leader)
    assert c.run_until(lambda: len(c.nodes[leader].backlog) >= 2, 10)  # both answered a heartbeat
    for f in followers:
        c.pause(f)
    c.run(5 * c.election_ticks // 2)
    c.resume(leader)
    assert (n.role, n.current_term) == (Role.LEADER, term)
    r = c.client_read(leader, "k", lease=True)
    assert r is not None and r.read_index is None, "a lease read served on a lease that ran out in the stall"
    assert c.run_until(lambda: all(c.nodes[f].backlog for f in followers), 10)  # its heartbeat waits for them
    resumed_at = c.now
    for f in followers:
        c.resume(f)
    c.run(c.election_ticks)
    assert c.leader() == leader and n.current_term == term
    campaigns = [e for e in c.trace if "candidate" in e and int(e.split()[0][2:]) >= resumed_at]
    assert not campaigns, campaigns
    c.run(200)
    assert c.reads_checked >= 1


def test_ready_must_sync_only_for_entries_snapshots_terms_and_votes():
    """etcd's MustSync: a Ready whose only change is the commit index needs no fsync (a lost commit index is
    learnt again from the leader); one with entries, or a new term or vote, does."""
    c = Cluster(seed=7)
    leader = elect(c)
    follower = next(n for n in c.nodes if n != leader)
    node = c.nodes[follower].node
    term = node.current_term
    commit = node.commit_index
    last = node.log.last_index
    # New entries: synced.
    node.step(AppendEntries(leader, follower, term, last, node.log.term(last),
                            (Entry(term, last + 1, EntryKind.COMMAND, b"x"),), commit))
    rd = node.ready()
    assert rd.entries and rd.must_sync
    node.advance(rd)
    # The leader's next message only moves the commit index: written, not synced.
    node.step(AppendEntries(leader, follower, term, last + 1, term, (), last + 1))
    rd = node.ready()
    assert rd.hard_state is not None and rd.hard_state.commit_index == last + 1
    assert not rd.entries and not rd.must_sync
    node.advance(rd)
    # A new term: synced.
    node.step(AppendEntries(leader, follower, term + 1, last + 1, term, (), last + 1))
    rd = node.ready()
    assert rd.hard_state.current_term == term + 1 and rd.must_sync
    node.advance(rd)


def test_a_one_voter_leader_says_nothing_before_its_new_term_is_saved():
    """§5.1 and Figure 2 (save before you speak): a lone voter wins its election inside one Ready, whose hard state
    holds the new term and its own vote. Its appends to a learner may not go out early (thesis §10.2.1) then: had
    they left and the node crashed before the save, it would come back in the old term, win the same term again
    and write other entries under it, and the learner, holding the first ones at the same (index, term), would
    keep and apply them."""
    c = Cluster(seed=13, n=1, spares=1, config_overrides={"auto_promote": False})
    elect(c)
    assert c.change_membership(ConfChangeKind.ADD_LEARNER, "n2")
    write(c, "a")
    c.run(20)
    assert c.nodes["n2"].kv.data == c.nodes["n1"].kv.data
    c.crash("n1")
    c.restart("n1")
    n1 = c.nodes["n1"].node
    term = n1.current_term
    for _ in range(100):  # by hand: the election and a proposal in one drive, as the runtime batches them
        n1.tick()
        if n1.role is Role.LEADER:
            break
    assert n1.role is Role.LEADER and n1.current_term == term + 1
    n1.propose(b"a=never-saved")
    rd = n1.ready()
    assert rd.hard_state is not None and rd.hard_state.current_term == term + 1
    early, _ = rd.split_messages()
    c.cut.add(("n2", "n1"))  # the learner's answer is lost: it would have told n1 the term it forgot
    for m in early:
        c.send(m)
    c.crash("n1")  # before the save: nothing of that Ready is on its disk
    c.restart("n1")
    elect(c)
    c.heal()
    assert c.nodes["n1"].node.current_term == term + 1  # the same term, won a second time
    write(c, "a")
    c.run(50)
    assert c.nodes["n2"].kv.data == c.nodes["n1"].kv.data


def _without_read_acks_from(nodes: set[str]):
    """A deliver filter: these nodes' answers to heartbeats still count for replication, not for read rounds."""

    def strip(m):
        if isinstance(m, AppendEntriesReply) and m.src in nodes and m.read_round:
            return dataclasses.replace(m, read_round=0)
        return m

    return strip


def test_a_read_round_counts_only_the_voters_of_the_current_configuration():
    """Thesis §6.4: a read is served once a majority of the configuration confirms the leader after the read
    arrived. An acknowledgement from a voter removed since then is no part of that majority (etcd counts its
    current voters only)."""
    c = Cluster(seed=14, n=5, election_ticks=50)  # long timeouts: nothing expires while the test holds the read
    leader = elect(c)
    gone, *rest = [i for i in c.ids if i != leader]
    c.deliver_filter = _without_read_acks_from(set(rest))
    r = c.client_read(leader, "k", lease=False)
    c.run(10)  # `gone` acknowledges the round: 2 of 5, not yet a majority
    assert r.read_index is None and r.request_id in c.pending_reads[leader]
    assert c.change_membership(ConfChangeKind.REMOVE, gone)
    n = c.nodes[leader].node
    assert c.run_until(lambda: n.commit_index >= n.log.last_index and gone not in n.membership.voters, 50)
    c.deliver_filter = _without_read_acks_from(set(rest[1:]))  # one more voter acknowledges: 2 of the 4 voters
    c.run(20)
    assert r.read_index is None and r.request_id in c.pending_reads[leader], "served on a minority's word"
    c.deliver_filter = None
    before = c.reads_checked
    assert c.run_until(lambda: c.reads_checked > before, 50)
    assert r.read_index is not None


def test_a_snapshot_transfer_is_finished_while_the_leader_takes_newer_snapshots():
    """§7: a far-behind follower gets the leader's snapshot in chunks (64 bytes in the simulator). The leader takes
    a new snapshot every 15 ticks, faster than one transfer takes, under steady writes; the transfer under way is
    finished rather than started again from byte 0, so the follower moves forward, snapshot after snapshot, and
    catches up once the leader stops snapshotting."""
    c = Cluster(seed=15, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    for k in range(100):
        write(c, f"key{k}", ticks=500)
    c.take_snapshot(leader)
    size = len(c.nodes[leader].node.snapshot.data)
    assert size > 30 * 64, size  # dozens of chunks: a transfer takes longer than the 15 ticks between snapshots
    c.restart(lagger)
    first = c.nodes[leader].node.snapshot.last_included_index
    installed = set()
    for t in range(600):
        if t % 3 == 0:
            c.client_write(leader, f"key{t % 100}")
        if t % 15 == 0:
            c.take_snapshot(leader)
        c.tick()
        installed.add(c.nodes[lagger].node.log.snapshot_index)
    assert c.leader() == leader
    assert max(installed) >= first and len(installed - {0}) >= 3, sorted(installed)
    for k in range(10):  # no more snapshots: the follower catches up through the log
        write(c, f"key{k}")
    assert c.run_until(lambda: c.nodes[lagger].kv.data == c.nodes[leader].kv.data, 500)


def test_a_pre_vote_granted_in_an_earlier_round_does_not_count_in_a_later_one():
    """Thesis §9.6: a pre-candidate becomes a candidate only when a majority would vote for it now. A grant from an
    earlier round at the same term (delayed, or duplicated by the network) is no such answer: counted in a later
    round, it let a node cut off from a healthy leader start a real election, and its new term deposed the leader.
    Five voters; the leader L keeps a majority throughout. X never hears L. A, then B, stop hearing L for a while,
    so each would vote for X at that time, but never both at once."""
    c = Cluster(seed=16, n=5)
    leader = elect(c)
    term = c.nodes[leader].node.current_term
    x, a, b, _ = [i for i in c.ids if i != leader]
    held, granted_by_b = [], []

    def network(m):
        if isinstance(m, RequestVoteReply) and m.dst == x and m.pre_vote and m.vote_granted:
            if m.src == a and not held:
                held.append(m)  # A's grant of an early round, delivered late (below)
                return None
            if m.src == b:
                granted_by_b.append(m)
        return m

    c.deliver_filter = network
    c.cut |= {(leader, x), (leader, a)}
    assert c.run_until(lambda: held, 300), "A never granted X a pre-vote"
    c.cut.discard((leader, a))  # A hears the leader again (and would not grant X now) ...
    c.cut.add((leader, b))  # ... and B stops hearing it
    assert c.run_until(lambda: granted_by_b, 300), "B never granted X a pre-vote"
    c.send(held[0])  # the old grant from A arrives in the same round as B's: X + B + stale A is 3 of 5
    c.run(40)
    assert c.nodes[x].node.current_term == term, "X started an election on a stale pre-vote"
    c.heal()
    c.run(100)
    assert c.leader() == leader and c.nodes[leader].node.current_term == term


def test_forwarded_reads_that_are_never_answered_fail_in_bounded_time():
    """Thesis §6.4: a follower forwards reads to the leader. A request lost on the way (a reply timeout, a full
    queue) is never answered; under a stable leader nothing else ends it. It must fail within a bound (two
    election timeouts) so that the caller retries and the follower does not keep it forever."""
    c = Cluster(seed=17, n=3)
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    node = c.nodes[follower].node
    c.deliver_filter = lambda m: None if isinstance(m, ReadIndexRequest) else m
    reads = [c.client_read(follower, "k", lease=False) for _ in range(5)]
    assert all(r is not None for r in reads) and node.reads_pending == 5
    c.run(2 * c.election_ticks + 1)
    assert [r.request_id for r in reads if r.request_id in c.pending_reads[follower]] == []  # failed: retry
    assert node.reads_pending == 0
    assert c.leader() == leader and c.nodes[leader].node.current_term == node.current_term
    c.deliver_filter = None
    before = c.reads_checked
    c.client_read(follower, "k", lease=False)
    assert c.run_until(lambda: c.reads_checked > before, 50)


def test_a_late_read_reply_to_a_restarted_follower_does_not_answer_its_new_reads():
    """Thesis §6.4: a follower serves a read at the index its leader answered for that read. A ReadIndexReply held
    in the network across the follower's restart must not answer the new process's read, which began after a newer
    write was acknowledged: that would be a stale read. Read ids are drawn afresh per process (readonly.request_ids),
    as the runtime draws them; with ids counted from 1 in each process, the new read reuses the old id and the
    simulator's history check finds the stale value."""
    c = Cluster(seed=1, n=3)
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    write(c, "k")
    held: list[ReadIndexReply] = []

    def hold_first_reply(m):
        if isinstance(m, ReadIndexReply) and m.dst == follower and not held:
            held.append(m)
            return None
        return m

    c.deliver_filter = hold_first_reply
    assert c.client_read(follower, "k", lease=False) is not None
    assert c.run_until(lambda: held, 50), "the leader never answered the read"
    c.deliver_filter = None
    c.crash(follower)
    c.restart(follower)
    write(c, "k")  # acknowledged before the new read begins
    node = c.nodes[follower].node
    assert c.run_until(lambda: node.leader_id == leader and node.last_applied >= held[0].read_index, 200)
    new = c.client_read(follower, "k", lease=False)
    assert new is not None
    c.send(held[0])  # the old answer arrives now
    c.run(20)  # the new read is served at a fresh read index, not the old one (else: SafetyViolation)
    assert new.read_index is not None and new.read_index > held[0].read_index


def test_reads_on_a_leader_that_cannot_commit_in_its_term_fail_in_bounded_time():
    """Thesis §6.4 step 1: a new leader serves reads only once an entry of its term has committed. One that hears
    from its followers (so check-quorum keeps it) but cannot get its entries to them never commits: its reads
    and its followers' must not wait for that forever."""
    c = Cluster(seed=18, n=3)

    def no_entries(m):
        return dataclasses.replace(m, entries=()) if isinstance(m, AppendEntries) and m.entries else m

    c.deliver_filter = no_entries
    assert c.run_until(lambda: c.leader() is not None, 500)
    leader = c.leader()
    n = c.nodes[leader].node
    follower = next(i for i in c.ids if i != leader)
    mine = c.client_read(leader, "k", lease=False)
    theirs = c.client_read(follower, "k", lease=False)
    c.run(3)
    assert n.log.term(n.commit_index) != n.current_term and n.reads_pending == 2
    c.run(2 * c.election_ticks + 5)
    assert c.leader() == leader and n.log.term(n.commit_index) != n.current_term
    assert mine.request_id not in c.pending_reads[leader] and theirs.request_id not in c.pending_reads[follower]
    assert n.reads_pending == 0 and c.nodes[follower].node.reads_pending == 0


def test_a_removed_node_learns_that_it_was_removed_and_disturbs_nobody():
    """Thesis §4.2.3: the leader stops sending to a node once the configuration without it is appended, so the
    removed node never gets that entry; it times out and asks for pre-votes, for ever. Pre-vote and the members'
    leader leases keep it from disturbing anyone (§9.6). Now the members also answer it with Removed (as etcd
    answers a removed member), so it can say why it is idle; re-added under the same id, it forgets the notice as
    soon as the leader sends it entries, and serves as a voter again."""
    c = Cluster(seed=19, n=3)
    leader = elect(c)
    term = c.nodes[leader].node.current_term
    gone = next(i for i in c.ids if i != leader)
    notices = []
    c.deliver_filter = lambda m: (notices.append(m) or m) if isinstance(m, Removed) else m
    assert c.change_membership(ConfChangeKind.REMOVE, gone)
    index = c.nodes[leader].node.log.last_index
    n = c.nodes[gone].node
    assert c.run_until(lambda: n.removed is not None, 300), "the removed node was never told"
    assert n.removed == (leader, index)
    assert gone not in c.nodes[leader].node.membership.node_ids and gone in n.membership.voters
    c.run(300)
    assert c.leader() == leader and c.nodes[leader].node.current_term == term
    assert n.removed == (leader, index) and n.role is not Role.LEADER
    assert c.change_membership(ConfChangeKind.ADD_LEARNER, gone)
    assert c.run_until(lambda: gone in c.nodes[leader].node.membership.voters, 500)
    assert n.removed is None
    # A notice from before the node was added again, delayed or duplicated by the network, arrives now: its
    # configuration is older than the one the node holds, with itself in it, so it is stale and changes nothing.
    assert n.log.membership_entries()[-1].index > index and gone in n.membership.node_ids
    n.step(notices[0])
    c.process(gone)
    assert n.removed is None, "took a notice older than its own configuration"
    write(c)
    assert c.leader() == leader


def test_a_removed_notice_only_informs():
    """A Removed notice can come from a node with a stale view, or be plain wrong. It must cost nothing: a member
    that holds one (here from the current term and from an older one: terms do not tell a stale notice) still
    campaigns, wins and serves; it forgets the notice then."""
    c = Cluster(seed=20, n=3)
    leader = elect(c)
    term = c.nodes[leader].node.current_term
    a, b = [i for i in c.ids if i != leader]
    c.isolate(leader)
    for x, notice_term in ((a, term - 1), (b, term)):
        c.nodes[x].node.step(Removed(leader, x, notice_term, 1, leader))
        c.process(x)
        assert c.nodes[x].node.removed == (leader, 1)
    assert c.run_until(lambda: c.leader() in (a, b), 500)
    write(c)
    c.run(20)
    assert c.nodes[a].node.removed is None and c.nodes[b].node.removed is None


def test_a_removed_node_whose_term_ran_ahead_still_learns_that_it_was_removed():
    """Without pre-vote (a library user's choice, thesis §9.6), a removed node campaigns in real elections: its
    term runs ahead of the members', and every Removed notice comes at a member's own, lower term. The notice is
    still taken (its configuration index, not its term, tells whether it is stale), or the node would never
    learn why nobody follows it."""
    c = Cluster(seed=19, n=3, config_overrides={"pre_vote": False})
    leader = elect(c)
    term = c.nodes[leader].node.current_term
    gone = next(i for i in c.ids if i != leader)
    assert c.change_membership(ConfChangeKind.REMOVE, gone)
    index = c.nodes[leader].node.log.last_index
    n = c.nodes[gone].node
    assert c.run_until(lambda: n.removed is not None, 300), "the removed node was never told"
    assert n.removed == (leader, index) and n.current_term > term  # told, at a term below its own
    c.run(100)
    assert c.leader() == leader and c.nodes[leader].node.current_term == term


def test_a_removal_that_never_commits_is_never_announced():
    """Thesis §4.1: a configuration is in force once appended, committed or not, and an uncommitted one can be
    overwritten. The leader appends the removal of G but cannot commit it (its other voter is cut off); G, which
    no longer hears from it, keeps talking to it (answers, then votes). Only a committed configuration is
    announced (`Removed`): this one is lost when the other two elect a leader without it, and G was never told
    that it was out."""
    c = Cluster(seed=22, n=3)
    leader = elect(c)
    gone, other = [i for i in c.ids if i != leader]
    notices, spoke = [], []

    def network(m):
        if isinstance(m, Removed):
            notices.append(m)
        elif (m.src, m.dst) == (gone, leader):
            spoke.append(m)
        return m

    c.deliver_filter = network
    c.cut |= {(leader, other), (other, leader)}
    assert c.change_membership(ConfChangeKind.REMOVE, gone)
    removal = c.nodes[leader].node.log.last_index
    assert c.run_until(lambda: c.leader() not in (None, leader), 500)
    old = c.nodes[leader].node
    assert old.commit_index < removal and gone not in old.membership.node_ids and spoke  # G spoke to it meanwhile
    c.heal()
    c.run(200)
    assert gone in c.nodes[c.leader()].node.membership.voters and gone in old.membership.voters  # overwritten
    assert notices == [] and c.nodes[gone].node.removed is None


def test_a_stale_rejection_does_not_restart_a_snapshot_transfer():
    """§7: while a snapshot is sent to a follower, no append goes to it, so a rejected append it answers is from
    before the transfer (delayed or duplicated by the network). Taken as news, it would put the follower back to
    probing, and the probe, finding its entries compacted, would start the transfer again from byte 0."""
    c = Cluster(seed=15, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    rejections = []
    c.crash(lagger)
    for k in range(60):
        write(c, f"key{k}", ticks=500)
    c.take_snapshot(leader)
    c.deliver_filter = lambda m: (
        (rejections.append(m) or m) if isinstance(m, AppendEntriesReply) and m.src == lagger and not m.success
        else m)
    c.restart(lagger)
    n = c.nodes[leader].node
    pr = n.progress(lagger)
    assert c.run_until(lambda: pr.state is ProgressState.SNAPSHOT and pr.snapshot_offset > 64, 200)
    assert rejections  # the probe that found the follower behind
    offset = pr.snapshot_offset
    chunks = []
    c.deliver_filter = lambda m: (chunks.append(m) or m) if isinstance(m, InstallSnapshot) else m
    n.step(rejections[0])
    assert pr.state is ProgressState.SNAPSHOT and pr.snapshot_offset == offset
    c.process(leader)
    c.run(10)
    assert chunks and chunks[0].offset >= offset, "the transfer started again"
    c.deliver_filter = None
    assert c.run_until(lambda: c.nodes[lagger].kv.data == c.nodes[leader].kv.data, 500)


def test_reads_are_served_while_a_follower_needed_for_a_majority_receives_a_snapshot():
    """Thesis §6.4, §6.4.1: a read round, and the lease, need the acknowledgement of a majority. Of three voters
    one is down and the other is far behind, so it gets the leader's snapshot, in 64-byte chunks over longer than
    a read may wait (read_timeout_ticks). Its acknowledgements are needed throughout: every read, with a round or
    on the lease, is served during the transfer, none fails."""
    c = Cluster(seed=15, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger, other = [i for i in c.ids if i != leader]
    c.crash(lagger)
    for k in range(150):
        write(c, f"key{k}", ticks=500)
    c.take_snapshot(leader)
    c.crash(other)
    c.restart(lagger)
    n = c.nodes[leader].node
    pr = n.progress(lagger)
    reads, lease_reads, transfer_ticks = [], [], 0
    for t in range(500):
        if pr.state is ProgressState.SNAPSHOT:
            transfer_ticks += 1
            if t % 5 == 0:
                reads.append(c.client_read(leader, "key1", lease=False))
                lease_reads.append(c.client_read(leader, "key1", lease=True).read_index)  # None: not at once
        elif transfer_ticks:
            break
        c.tick()
    assert transfer_ticks > n._reads.read_timeout_ticks + 10, transfer_ticks  # reads would have timed out meanwhile
    assert c.nodes[lagger].node.log.snapshot_index == n.log.snapshot_index  # the transfer did finish
    assert c.leader() == leader  # check-quorum kept it: the lagger's replies count as activity
    c.run(50)
    assert len(reads) > 5 and [r.start for r in reads if r.read_index is None] == []
    assert None not in lease_reads, "the lease lapsed during the transfer"


def test_a_removed_node_is_not_given_a_read_index_it_can_never_apply():
    """Thesis §6.4, §4.2.2: for up to an election timeout after its removal a node still knows the leader and
    forwards its reads. The leader sends it no more entries, so any read index it got (at least the removal's
    index) would never be applied there: the leader does not take reads from nodes outside its configuration,
    and the removed node fails them within read_timeout_ticks instead of holding them for ever."""
    c = Cluster(seed=19, n=3)
    leader = elect(c)
    gone = next(i for i in c.ids if i != leader)
    assert c.change_membership(ConfChangeKind.REMOVE, gone)
    c.run(3)
    n = c.nodes[gone].node
    assert n.leader_id == leader and n.removed is None
    r = c.client_read(gone, "k", lease=False)
    assert r is not None and n.reads_pending == 1
    c.run(n._reads.read_timeout_ticks + 1)
    assert r.read_index is None and r.request_id not in c.pending_reads[gone] and n.reads_pending == 0
    assert c.nodes[leader].node.reads_pending == 0


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"read_timeout_ticks": 0}, "read_timeout_ticks must be an integer of at least 10, not 0"),
        ({"read_timeout_ticks": 9}, "read_timeout_ticks must be an integer of at least 10, not 9"),
        ({"lease_ticks": 10}, r"lease_ticks \(10\) must be below election_ticks \(10\)"),
        ({"election_ticks": 0}, "election_ticks must be an integer of at least 1, not 0"),
        ({"heartbeat_ticks": 1.5}, "heartbeat_ticks must be an integer of at least 1, not 1.5"),
        ({"max_uncommitted_bytes": 0}, "max_uncommitted_bytes must be an integer of at least 1, not 0"),
        ({"max_inflight_messages": 0}, "max_inflight_messages must be an integer of at least 1, not 0"),
        ({"max_inflight_bytes": 1.5}, "max_inflight_bytes must be an integer of at least 1, not 1.5"),
    ],
)
def test_a_config_the_protocol_cannot_run_on_is_refused(fields, why):
    """A read timeout of 0 used to mean the default, and one below a round trip failed every read; a lease as long
    as an election timeout leaves no margin for clock drift (thesis §6.4.1). Each is refused, naming the field."""
    with pytest.raises(ValueError, match=why):
        Config("n1", **fields)
    assert Config("n1", read_timeout_ticks=10).read_timeout_ticks == 10  # the smallest allowed


def test_reads_fail_after_the_read_timeout_given():
    """Config.read_timeout_ticks is the bound a read waits (thesis §6.4), not only the default of two election
    timeouts: a forwarded read whose request is lost fails right after it."""
    c = Cluster(seed=17, n=3, config_overrides={"read_timeout_ticks": 13})
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    c.deliver_filter = lambda m: None if isinstance(m, ReadIndexRequest) else m
    r = c.client_read(follower, "k", lease=False)
    c.run(12)
    assert r.request_id in c.pending_reads[follower]
    c.run(1)
    assert r.request_id not in c.pending_reads[follower] and r.read_index is None


def test_a_removed_notice_names_an_index_at_or_after_the_removal():
    """§7: a snapshot keeps the configuration in force at its index, not the index of that configuration's entry.
    Members that compacted the removal into a snapshot and restarted can only name the snapshot's index: the node
    was removed at or before it (so the notice, the log line and /status say "at or before"). Never earlier than
    the removal, and a stale-notice check on it stays sound."""
    c = Cluster(seed=19, n=3)
    leader = elect(c)
    gone = next(i for i in c.ids if i != leader)
    c.isolate(gone)
    assert c.change_membership(ConfChangeKind.REMOVE, gone)
    removal = c.nodes[leader].node.log.last_index
    for k in range(5):
        write(c, f"k{k}")
    c.run(10)
    for i in c.ids:
        if i != gone:
            c.take_snapshot(i)
            c.crash(i)
            c.restart(i)
    elect(c)
    snapshot_index = c.nodes[c.leader()].node.log.snapshot_index
    assert snapshot_index > removal
    c.heal()
    n = c.nodes[gone].node
    assert c.run_until(lambda: n.removed is not None, 300)
    assert n.removed[1] == snapshot_index  # at or before: removal <= snapshot_index


def test_status_is_a_frozen_copy_of_what_the_node_knows():
    """RaftNode.status(): what /status, /cluster, /metrics and the choice of a successor read, instead of the
    node's fields. Followers' progress only on the leader, and not the leader's own."""
    c = Cluster(seed=1, n=3)
    leader = elect(c)
    write(c)
    c.run(5)
    n = c.nodes[leader].node
    st = n.status()
    assert (st.node_id, st.role, st.term, st.leader_id, st.removed, st.reads_pending) == (
        leader, Role.LEADER, n.current_term, leader, None, 0)
    assert (st.commit_index, st.last_applied, st.last_index, st.snapshot_index) == (
        n.commit_index, n.last_applied, n.log.last_index, n.log.snapshot_index) and st.commit_index >= 3
    assert st.membership == n.membership
    followers = sorted(i for i in c.ids if i != leader)
    assert list(st.progress) == followers
    assert [st.progress[f].match_index for f in followers] == [n.log.last_index] * 2
    assert {p.state for p in st.progress.values()} == {ProgressState.REPLICATE}
    write(c)
    assert n.commit_index > st.commit_index and n.status().commit_index == n.commit_index  # a copy, not a view
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.term = 99  # type: ignore[misc]
    fst = c.nodes[followers[0]].node.status()
    assert fst.role is Role.FOLLOWER and fst.leader_id == leader and len(fst.progress) == 0


class _GoneSource:
    """A snapshot's source whose file went away after `reads` reads (an I/O error): every later read raises
    SnapshotUnreadable, as the runtime's SnapshotFile does."""

    def __init__(self, data: bytes, reads: int) -> None:
        self.data, self.reads = data, reads

    def __len__(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        if self.reads <= 0:
            raise SnapshotUnreadable("gone")
        self.reads -= 1
        return self.data[offset : offset + length]


def test_a_transfer_whose_source_is_gone_is_abandoned_and_restarted_from_the_newest_snapshot():
    """snapfork review, finding 1: a leader streaming a snapshot whose file could no longer be read raised out of
    step() (the runtime then stopped the node). The transfer is abandoned instead, and the follower catches up
    from the leader's newest snapshot; while there is no newer one, the leader keeps trying the same."""
    c = Cluster(seed=21, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    for k in range(60):
        write(c, f"key{k}", ticks=500)
    c.take_snapshot(leader)
    n = c.nodes[leader].node
    snap = n.snapshot
    assert snap is not None and len(snap.data) > 4 * 64
    gone = _GoneSource(bytes(snapshot_chunk(snap.data, 0, len(snap.data))), reads=2)
    n._snapshot = dataclasses.replace(snap, data=gone)
    c.restart(lagger)
    c.run(60)  # the transfer starts, then its source is gone: no exception, the follower has not installed it
    assert gone.reads == 0 and c.nodes[lagger].node.log.snapshot_index == 0
    # Third review, item C: counted, with what failed, for the runtime to log.
    assert n.snapshot_reads_failed >= 1
    assert n.last_snapshot_read_failure == (lagger, snap.last_included_index, "gone")
    assert n.snapshot_read_failures == {lagger: (n.snapshot_reads_failed, snap.last_included_index, "gone")}
    for k in range(10):
        write(c, f"more{k}")
    c.take_snapshot(leader)  # a newer snapshot: the transfer starts over from it
    assert c.run_until(lambda: c.nodes[lagger].kv.data == c.nodes[leader].kv.data, 1000)
    assert c.nodes[lagger].node.log.snapshot_index > snap.last_included_index


def _follower_b(**config) -> RaftNode:
    membership = Membership(("a", "b"), (), (Member("a", "raft-a", ""), Member("b", "raft-b", "")))
    log = RaftLog()
    log.append([Entry(1, 1, EntryKind.MEMBERSHIP, b"", membership)])
    return RaftNode(Config("b", election_ticks=1000, **config), random.Random(1), HardState(1, None, 1), log)


@pytest.mark.parametrize("cap, pieces", [
    ({"max_committed_entries_per_ready": 3}, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]),
    # Entry.size is len(data) + 24: 24 for the configuration at 1, 30 for the small ones, so two fit in 64 bytes;
    # entry 6 (124) exceeds the bound alone and still comes, alone: at least one entry per Ready.
    ({"max_committed_bytes_per_ready": 64}, [[1, 2], [3, 4], [5], [6], [7, 8], [9, 10], [11]]),
    ({}, [list(range(1, 12))]),
])
def test_a_committed_backlog_over_the_cap_is_handed_out_in_order_over_several_readys(cap, pieces):
    """Issue 13: a follower that restored a snapshot or fell behind found thousands of entries committed at once
    and applied them in one Ready, holding the event loop for 44-66 ms. Config.max_committed_entries_per_ready and
    max_committed_bytes_per_ready bound each Ready's committed_entries (at least one entry): the backlog comes in
    order, none skipped or repeated, last_applied moves a piece at a time, has_ready stays true until it is all
    applied, and a read waiting for the last index is given that index, not an earlier one."""
    n = _follower_b(**cap)
    entries = tuple(Entry(1, i, EntryKind.COMMAND, (b"x" * 100) if i == 6 else b"k=v%03d" % i) for i in range(2, 12))
    n.step(AppendEntries("a", "b", 1, 1, 1, entries, 11))
    n.read_index(7)  # forwarded to the leader in the first Ready
    assert n.commit_index == 11 and n.last_applied == 0
    handed_out: list[list[int]] = []
    read_states: list[tuple[int, int]] = []
    while (rd := n.ready()) is not None:
        read_states += rd.read_states
        if rd.committed_entries:
            handed_out.append([e.index for e in rd.committed_entries])
        n.advance(rd)
        if any(isinstance(m, ReadIndexRequest) for m in rd.messages):
            n.step(ReadIndexReply("a", "b", 1, (7,), 11))  # the leader's answer arrives while we apply
        assert n.last_applied == (handed_out[-1][-1] if handed_out else 0)
        assert n.apply_pending == (n.last_applied < 11)
        assert n.has_ready() or not n.apply_pending
    assert handed_out == pieces
    assert n.last_applied == 11 and not n.has_ready()
    assert read_states == [(7, 11)]


def test_by_default_a_backlog_of_big_transactions_is_handed_out_a_few_entries_a_ready():
    """Issue 13 (stall1m): loading 1,000,000 keys in transactions of 100 puts (bench/scale.py --batch 100), each
    entry ~12 KB and ~100 writes' work, the default bytes bound (then 1 MiB: 85 such entries, 8,500 puts) let one
    Ready hold the loop 13 ms of CPU, 100-800 ms on a busy machine, and leaders stepped down. By default a Ready
    now carries about as much work as 256 plain writes: a handful of such entries."""
    n = _follower_b()
    transaction = b"p" * 12_000  # the size of a TXN of 100 puts of 100-byte values (store.command)
    entries = tuple(Entry(1, i, EntryKind.COMMAND, transaction) for i in range(2, 42))
    n.step(AppendEntries("a", "b", 1, 1, 1, entries, 41))
    largest = 0
    while (rd := n.ready()) is not None:
        largest = max(largest, sum(1 for e in rd.committed_entries if e.data == transaction))
        n.advance(rd)
    assert n.last_applied == 41
    assert 1 <= largest <= 8, f"{largest} transactions of 100 puts applied in one Ready"


@pytest.mark.parametrize("restore_in_steps", [True, False])
def test_the_ready_carrying_a_leaders_snapshot_hands_out_no_entry_past_it(restore_in_steps):
    """§7, second review of snapfork, finding 1: a snapshot's final chunk and an append past it (leader_commit
    above the snapshot) stepped in one drive. The Ready that carries the snapshot handed out the entry after it
    too; a runtime restoring the snapshot piece by piece applied that entry to the OLD state, which the restore
    then replaced: the write was lost on this node and last_applied never came back to it. The entry must come
    only once the state machine holds the snapshot: after `advance`, or after `snapshot_applied`."""
    n = _follower_b()
    membership = n.membership
    data = b"the state at 50"
    n.step(InstallSnapshot("a", "b", 2, 50, 2, membership, 0, data, True))
    after = Entry(2, 51, EntryKind.COMMAND, b"after=51")
    n.step(AppendEntries("a", "b", 2, 50, 2, (after,), 51))
    assert n.commit_index == 51
    rd = n.ready()
    assert rd is not None and rd.snapshot is not None and rd.snapshot.last_included_index == 50
    assert [e.index for e in rd.entries] == [51]
    assert rd.committed_entries == [], "an entry past the snapshot handed out with it"
    n.advance(rd, snapshot_applied=not restore_in_steps)
    if restore_in_steps:
        assert n.last_applied < 50 and n.ready() is None  # nothing is applied while the restore runs
        n.snapshot_applied(50)
        assert n.last_applied == 50
    rd = n.ready()
    assert rd is not None and [e.index for e in rd.committed_entries] == [51]
    n.advance(rd)
    assert n.last_applied == 51


@pytest.mark.parametrize("restore_in_steps", [True, False])
def test_status_says_restoring_only_once_the_leaders_snapshot_is_held_whole(restore_in_steps):
    """Review of health, Q2: NodeStatus.restoring_snapshot (/readyz's `applying: restoring a snapshot`) is false
    while chunks come (only receiving_snapshot), true from the last chunk until the state machine holds the
    snapshot (advance with snapshot_applied, or snapshot_applied after a restore by steps), then both are false."""
    n = _follower_b()
    membership = n.membership
    data = b"the state at 50" * 4

    def says() -> tuple[bool, bool]:
        status = n.status()
        return status.receiving_snapshot, status.restoring_snapshot

    n.step(InstallSnapshot("a", "b", 2, 50, 2, membership, 0, data[:20], False))
    assert says() == (True, False)
    n.advance(n.ready())
    assert says() == (True, False), "a transfer under way is no restore"
    n.step(InstallSnapshot("a", "b", 2, 50, 2, membership, 20, data[20:], True))
    assert says() == (True, True)  # held whole, not yet saved nor restored
    rd = n.ready()
    assert rd is not None and rd.snapshot is not None
    n.advance(rd, snapshot_applied=not restore_in_steps)
    if restore_in_steps:
        assert says() == (True, True) and n.last_applied < 50
        n.snapshot_applied(50)
    assert says() == (False, False) and n.last_applied == 50


class _RecordingSink(BytesSink):
    discarded = 0

    def discard(self) -> None:
        self.discarded += 1
        super().discard()


@pytest.mark.parametrize("how", ["log caught up", "candidate"])
def test_an_abandoned_incoming_transfer_is_let_go_at_once(how):
    """Second review of snapfork, finding 2: a transfer abandoned mid-way kept its sink (a *.received.tmp file and
    two descriptors in the runtime) until the next InstallSnapshot or a restart. It is discarded once the commit
    index reaches the snapshot's index (a leader that still had the entries caught us up by appends), and when we
    become a candidate (no leader of our new term sends us its chunks: a later one starts over from offset 0)."""
    n = _follower_b()
    n.config = dataclasses.replace(n.config, election_ticks=10, pre_vote=False)
    sinks: list[_RecordingSink] = []
    n.open_snapshot_sink = lambda meta: sinks.append(_RecordingSink()) or sinks[-1]
    n.step(InstallSnapshot("a", "b", 2, 50, 2, n.membership, 0, b"first chunk", False))
    assert len(sinks) == 1 and n._incoming_snapshot is not None
    if how == "log caught up":
        # The same leader in the same term (a new term or leader drops the transfer anyway: _reset).
        entries = tuple(Entry(2, i, EntryKind.COMMAND, b"k=%d" % i) for i in range(2, 61))
        n.step(AppendEntries("a", "b", 2, 1, 1, entries, 49))
        assert sinks[0].discarded == 0  # commit 49: the snapshot at 50 may still be wanted
        n.step(AppendEntries("a", "b", 2, 60, 2, (), 60))
    else:
        for _ in range(10 * n.config.election_ticks):
            n.tick()
            if n.role in (Role.CANDIDATE, Role.LEADER):
                break
        assert n.role in (Role.CANDIDATE, Role.LEADER)
    assert sinks[0].discarded == 1 and n._incoming_snapshot is None


def test_a_learner_lets_go_of_a_transfer_after_ten_election_timeouts_with_no_leader_heard():
    """Review of health, Q6: a learner removed (or whose leader went silent) mid-transfer never campaigns, so no
    _reset dropped its partial snapshot: /status said `restoring` for ever and the runtime kept its file and
    descriptor. It is dropped after LEARNER_TRANSFER_SILENCE_TIMEOUTS election timeouts with no leader heard; a leader
    heard in between keeps it (review health2, L1: after one timeout a lossy link's transfer started over and over)."""
    from raftlib.core import LEARNER_TRANSFER_SILENCE_TIMEOUTS as SILENCE
    m = Membership(("a", "b", "c"), ("d",))
    node = RaftNode(Config("d", election_ticks=10, pre_vote=True), random.Random(1), HardState(0, None, 0),
                    membership=m)
    sinks: list[_RecordingSink] = []
    node.open_snapshot_sink = lambda meta: sinks.append(_RecordingSink()) or sinks[-1]

    def run(ticks: int) -> None:
        for _ in range(ticks):
            node.tick()
            rd = node.ready()
            if rd:
                node.advance(rd)

    node.step(InstallSnapshot("a", "d", 2, 100, 2, m, 0, b"x" * 64, False))  # the first chunk of several
    node.advance(node.ready())
    run(10 * SILENCE - 1)
    node.step(AppendEntries("a", "d", 2, 0, 0, (), 0))  # the leader's heartbeat: it is still there
    run(50)  # five election timeouts of silence (a lossy link) keep it, whatever the constant says
    assert node.status().receiving_snapshot and sinks[0].discarded == 0, "dropped after five timeouts"
    run(10 * SILENCE - 51)
    assert node.status().receiving_snapshot and sinks[0].discarded == 0, "dropped while its leader spoke"
    run(1)  # SILENCE election timeouts since the leader was last heard
    status = node.status()
    assert not status.receiving_snapshot and not status.leader_active, status
    assert sinks[0].discarded == 1 and node.role is Role.FOLLOWER
    run(100)
    assert sinks[0].discarded == 1


@pytest.mark.parametrize("other", ["a restarted leader (next term)", "another leader"])
def test_a_transfer_resumes_only_from_chunks_of_the_same_leader_and_term(other):
    """Second review of snapfork, finding 3; third review, item B (§7): a transfer resumed across leaders on
    (index, term) alone, and two leaders' files at one index and term may differ in their bytes (another format in
    a rolling upgrade, after a leader restarts on a new version): the follower spliced one file's head onto the
    other's tail. It resumes only from the same sender in the same term (one leader in one term sends one file per
    index), with nothing added to the wire: another sender or term restarts the transfer from offset 0."""
    n = _follower_b()
    membership = n.membership
    old, new = b"A" * 100, b"B" * 100  # the same index, term and size; other bytes
    n.step(InstallSnapshot("a", "b", 3, 50, 2, membership, 0, old[:30], False))
    n.advance(n.ready())
    n.step(InstallSnapshot("a", "b", 3, 50, 2, membership, 30, old[30:60], False))  # same leader, term: resumed
    rd = n.ready()
    assert [(r.next_offset, r.done) for r in rd.messages] == [(60, False)]
    n.advance(rd)
    src, term = ("a", 4) if other.startswith("a restarted") else ("c", 4)
    # The next leader was told 60 bytes are held: it resumes at 60, from its own file.
    n.step(InstallSnapshot(src, "b", term, 50, 2, membership, 60, new[60:], True))
    rd = n.ready()
    assert rd is not None and rd.snapshot is None, "installed a snapshot spliced from two files"
    (reply,) = [r for r in rd.messages if isinstance(r, InstallSnapshotReply)]  # ("c" also hears it is no member)
    assert (reply.next_offset, reply.done) == (0, False)
    n.advance(rd)
    n.step(InstallSnapshot(src, "b", term, 50, 2, membership, 0, new[:60], False))
    n.advance(n.ready())
    n.step(InstallSnapshot(src, "b", term, 50, 2, membership, 60, new[60:], True))
    rd = n.ready()
    assert rd is not None and rd.snapshot is not None and snapshot_bytes(rd.snapshot.data) == new


class _BigSource:
    """A snapshot file of `size` bytes as the runtime's SnapshotFile presents it (its size and the checksum it ends
    with known without reading it), with `head` at its start and zeros after: no 2 GiB in memory."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.size, self.crc = head, size, 0xFFFFFFFF

    @property
    def identity(self) -> int:  # what SnapshotFile offered at b1120ea; unused since
        return (self.size << 32) | self.crc

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        data = self.head[offset:end]
        return data + bytes(end - offset - len(data))


def _leader_chunks(c: Cluster, leader: str, lagger: str, ticks: int) -> list:
    """The InstallSnapshot chunks `leader` sends `lagger` over `ticks` ticks (not delivered: the transfer stays at
    its first chunks)."""
    chunks: list = []
    c.deliver_filter = lambda m: (chunks.append(m), None)[1] if isinstance(m, InstallSnapshot) else m
    c.restart(lagger)
    c.run(ticks)
    c.deliver_filter = None
    return chunks


def test_a_snapshot_of_2_gib_and_more_goes_on_the_wire():
    """Third review of snapfork, item A (liveness): at b1120ea each chunk carried transfer_id = size << 32 | crc,
    which reaches 2**63 from 2 GiB on; the codec refuses such an integer and the receiver drops the whole frame
    (the heartbeat batched with it too): a snapshot that big could never be sent. The leader's chunks of a 2 GiB
    and of a 4 GiB snapshot must decode, on this version's codec and on 637af74's."""
    for size in (2 << 30, (4 << 30) + 12345):
        c = Cluster(seed=31, n=3, config_overrides=NO_CATCH_UP)
        leader = elect(c)
        lagger = next(i for i in c.ids if i != leader)
        c.crash(lagger)
        for k in range(20):
            write(c, f"key{k}", ticks=500)
        c.take_snapshot(leader)
        n = c.nodes[leader].node
        snap = n.snapshot
        n._snapshot = dataclasses.replace(snap, data=_BigSource(snapshot_bytes(snap.data), size))
        chunks = _leader_chunks(c, leader, lagger, 30)
        assert chunks and all(m.offset == 0 and not m.done for m in chunks)
        frame = codec.encode_batch(chunks)
        assert codec.decode_batch(frame) == chunks
        assert wire_637af74.equivalent(wire_637af74.decode_batch(frame), chunks)


def test_an_old_node_decodes_every_frame_a_new_leader_sends_while_it_catches_up():
    """Third review of snapfork, item B: a rolling upgrade. A follower of 637af74 (its decoder frozen in
    tests/wire_637af74.py) must decode each frame a new leader sends it (elections, appends, heartbeats and the
    InstallSnapshot chunks of a catch-up by snapshot): at b1120ea every chunk carried an added field, so the old
    node dropped each frame with a chunk, and the heartbeat batched with it."""
    c = Cluster(seed=33, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    for k in range(60):
        write(c, f"key{k}", ticks=500)
    c.take_snapshot(leader)
    sent: list = []
    c.deliver_filter = lambda m: (sent.append(m), m)[1] if m.src == leader and m.dst == lagger else m
    c.restart(lagger)
    assert c.run_until(lambda: c.nodes[lagger].kv.data == c.nodes[leader].kv.data, 1000)
    c.deliver_filter = None
    assert any(isinstance(m, InstallSnapshot) for m in sent) and any(isinstance(m, AppendEntries) for m in sent)
    for m in sent:
        assert wire_637af74.equivalent(wire_637af74.decode_batch(codec.encode_batch([m])), [m]), m
    assert wire_637af74.equivalent(wire_637af74.decode_batch(codec.encode_batch(sent[:50])), sent[:50])


def test_a_leader_that_steps_down_lets_go_of_the_snapshots_it_was_sending():
    """Third review of snapfork, item D: the snapshot a leader was sending stayed in its followers' Progress after
    it stepped down (and, at b1120ea, in _sent_identity too), until it led again and finished a transfer: in the
    runtime, a replaced snapshot's unlinked file kept its space and a descriptor. Once the transfer is over (done,
    or abandoned because we no longer lead), the core holds no snapshot but its own newest."""
    c = Cluster(seed=35, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    for k in range(60):
        write(c, f"key{k}", ticks=500)
    c.take_snapshot(leader)
    n = c.nodes[leader].node
    first = n.snapshot
    chunks = _leader_chunks(c, leader, lagger, 30)  # the transfer starts; nothing reaches the lagger
    assert chunks and n.progress(lagger).state is ProgressState.SNAPSHOT
    c.crash(lagger)
    for k in range(10):
        write(c, f"more{k}", ticks=500)
    c.take_snapshot(leader)  # replaces the first: in the runtime its file is unlinked
    assert n.snapshot is not first and n._progress[lagger].snapshot is first  # §7: the transfer under way goes on
    other = next(i for i in c.ids if i not in (leader, lagger))
    n.step(AppendEntries(other, leader, n.current_term + 1, 0, 0, (), 0))
    assert n.role is Role.FOLLOWER
    held = [pr.snapshot for pr in n._progress.values() if pr.snapshot is not None]
    assert held == [], "a follower still holds the snapshots it sent as leader"


def test_a_follower_reports_the_leaders_commit_index_not_only_its_own():
    """Review L1 (GET /readyz): a follower catching up sets its own commit index to at most its last new entry
    (§5.3), so it looked caught up while far behind. It keeps the newest leader_commit heard from its leader in
    this term; a message of a new term forgets it; a leader reports its own commit index."""
    c = Cluster(seed=7)
    leader = elect(c)
    follower = next(n for n in c.nodes if n != leader)
    node = c.nodes[follower].node
    assert c.nodes[leader].node.status().leader_commit == c.nodes[leader].node.commit_index
    term, last = node.current_term, node.log.last_index
    far = last + 5000
    node.step(AppendEntries(leader, follower, term, last, node.log.term(last),
                            (Entry(term, last + 1, EntryKind.COMMAND, b"x"),), far))
    status = node.status()
    assert (status.commit_index, status.leader_commit) == (last + 1, far)
    node.advance(node.ready())
    # An older message, reordered, does not move it back.
    node.step(AppendEntries(leader, follower, term, last + 1, term, (), last))
    assert node.status().leader_commit == far
    # A new term: nothing heard from its leader yet.
    node.advance(node.ready())
    node.step(AppendEntries(leader, follower, term + 1, last + 1, term, (), last + 1))
    assert node.status().leader_commit == last + 1


def _record_commit_only_appends(c: Cluster, leader: str) -> list:
    """From now on, the list of the AppendEntries `leader` sends without entries that are not heartbeats (no read
    round): those that carry only a commit index."""
    commit_only: list = []
    send = c.send

    def recording_send(m) -> None:
        if isinstance(m, AppendEntries) and m.src == leader and not m.entries and not m.read_round:
            commit_only.append(m)
        send(m)

    c.send = recording_send  # type: ignore[method-assign]
    return commit_only


def test_a_follower_learns_a_lone_writes_commit_without_waiting_for_a_heartbeat():
    """Watch fan-out (issue 14, bench/watch_fanout.py): the leader sent a commit index that moved without new
    entries only with the next append or heartbeat, so a lone write reached a follower's state machine, and its
    watchers, up to a heartbeat late. Now an idle follower gets it at once in an empty AppendEntries: here within
    the message delays after the write's acknowledgement (heartbeats every 40 ticks), for each of 5 writes, with
    one such append per follower per write and none once the commit stands."""
    c = Cluster(seed=11, heartbeat_ticks=40, election_ticks=200, max_delay=1)
    leader = elect(c, max_ticks=2000)
    followers = [c.nodes[n].node for n in c.nodes if n != leader]
    commit_only = _record_commit_only_appends(c, leader)
    written = []
    for i in range(5):
        c.run_until(lambda: False, 7 + 3 * i)  # writes at different phases of the heartbeat
        write(c, f"k{i}")
        index = c.nodes[leader].node.commit_index
        written.append(index)
        assert c.run_until(lambda: all(f.commit_index >= index for f in followers), 3), (
            f"write {i}: followers at {[f.commit_index for f in followers]}, the leader's commit {index}")
    sent_to = [(m.dst, m.leader_commit) for m in commit_only]
    assert len(set(sent_to)) == len(sent_to), f"a commit sent twice to a follower: {sent_to}"
    assert all((f.node_id, index) in sent_to for f in followers for index in written), sent_to
    sent = len(commit_only)
    c.run_until(lambda: False, 200)  # quiet: heartbeats only
    assert len(commit_only) == sent


def test_under_steady_writes_the_commit_index_rides_with_the_next_batch_and_goes_alone_once_they_stop():
    """The other half of the rule above: writes a tick apart (each batch within a tick of the last) send no empty
    append (one in flight would hold the next batch behind its round trip), and once they stop each follower gets
    the last commit index within two ticks, still before the heartbeat (every 40 ticks)."""
    c = Cluster(seed=5, heartbeat_ticks=40, election_ticks=200, max_delay=0)
    leader = elect(c, max_ticks=2000)
    followers = [c.nodes[n].node for n in c.nodes if n != leader]
    commit_only = _record_commit_only_appends(c, leader)
    c.run_until(lambda: False, 45)  # past the no-op's commit and a heartbeat
    commit_only.clear()
    writes = []
    for i in range(30):
        c.tick(clients=lambda: writes.append(c.client_write(leader, f"k{i}")))
    assert all(w is not None and w in c.acked_writes for w in writes)
    # The first write came after a quiet stretch: its commit went alone; the next 29 rode with the next batch.
    assert len(commit_only) <= len(followers), commit_only
    index = c.nodes[leader].node.commit_index
    assert index >= writes[-1].index
    assert c.run_until(lambda: all(f.commit_index >= index for f in followers), 3)
    assert sorted(m.dst for m in commit_only[-len(followers):]) == sorted(f.node_id for f in followers)


def _command(size: int) -> bytes:
    """A command of `size` bytes (at least 2) that the simulator's KV applies."""
    return b"k=" + b"v" * (size - 2)


def _committed_all(c: Cluster, node_id: str, ticks: int = 200) -> bool:
    n = c.nodes[node_id].node
    return c.run_until(lambda: n.role is Role.LEADER and n.commit_index == n.log.last_index, ticks)


def test_a_leader_that_cannot_commit_refuses_proposals_beyond_max_uncommitted_bytes():
    """etcd-io/raft's MaxUncommittedEntriesSize: a leader cut off from its followers (before check-quorum steps it
    down, thesis §6.2) takes proposals up to the bound of payload bytes not yet committed, refuses the next
    without appending it, and takes them again as entries commit. A configuration change is never refused: it
    has no payload."""
    c = Cluster(seed=31, n=3, spares=1, config_overrides={"max_uncommitted_bytes": 100})
    leader = elect(c)
    n = c.nodes[leader].node
    assert n.uncommitted_bytes == 0  # the no-op of its term has no payload, and it committed
    c.isolate(leader)
    n.propose(_command(40))
    n.propose(_command(40))
    last = n.log.last_index
    with pytest.raises(UncommittedBoundExceeded, match="80 bytes of entries not yet committed"):
        n.propose(_command(40))
    assert n.log.last_index == last and n.uncommitted_bytes == 80  # nothing appended
    n.propose(_command(20))  # up to the bound itself
    with pytest.raises(UncommittedBoundExceeded):
        n.propose(_command(2))
    assert n.uncommitted_bytes == 100 and n.status().uncommitted_bytes == 100  # GET /status, /metrics
    assert all(c.nodes[i].node.status().uncommitted_bytes == 0 for i in c.ids if i != leader)
    assert n.change_membership(ConfChange(ConfChangeKind.ADD_LEARNER, Member("n4"))) == last + 2
    c.heal()
    assert _committed_all(c, leader)
    assert n.uncommitted_bytes == 0
    n.propose(_command(100))


def test_a_proposal_when_nothing_is_uncommitted_is_taken_whatever_its_size():
    """An entry bigger than the bound could never be proposed if it were counted against an empty tail: it is
    taken when nothing is uncommitted, and holds off every other proposal until it commits."""
    c = Cluster(seed=32, n=3, config_overrides={"max_uncommitted_bytes": 10})
    leader = elect(c)
    n = c.nodes[leader].node
    n.propose(_command(1000))
    assert n.uncommitted_bytes == 1000
    with pytest.raises(UncommittedBoundExceeded):
        n.propose(_command(2))
    assert _committed_all(c, leader)
    assert n.uncommitted_bytes == 0
    n.propose(_command(2))


def test_a_leader_elected_again_counts_only_the_entries_of_its_new_term():
    """A leader that lost its leadership with entries uncommitted and wins again (its log the most up to date)
    counts from zero: those entries are of an earlier term and commit with its new no-op (§5.4.2), which is never
    refused. Counted on, they would hold the bound full for good: every proposal refused, nothing to commit."""
    c = Cluster(seed=33, n=3, config_overrides={"max_uncommitted_bytes": 10})
    leader = elect(c)
    n = c.nodes[leader].node
    term = n.current_term
    for node_id in c.ids:
        c.isolate(node_id)
    n.propose(_command(10))
    with pytest.raises(UncommittedBoundExceeded):
        n.propose(_command(2))
    assert c.run_until(lambda: n.role is not Role.LEADER, 100)  # check-quorum
    c.heal()
    c.isolate(next(i for i in c.ids if i != leader))  # only the old leader can win: its log is ahead
    assert c.run_until(lambda: n.role is Role.LEADER, 500)
    assert n.current_term > term and n.uncommitted_bytes == 0
    n.propose(_command(2))
    assert _committed_all(c, leader)
    assert n.uncommitted_bytes == 0 and n.log.term(n.commit_index) == n.current_term


def test_a_node_restoring_its_snapshot_ignores_timeout_now_until_it_is_in():
    """Review of fastrestore, L1: TimeoutNow (a transfer, or a removed leader's hand-over, which picks the voter
    with the longest log: a restoring node's is whole) made a node whose state machine lacks its snapshot campaign
    without pre-vote and win, and the cluster then applied nothing until its restore ended. It ignores TimeoutNow
    while it restores, and obeys it once the snapshot is in."""
    membership = Membership(("a", "b", "c"))
    snap = Snapshot(10, 2, membership, b"state")
    node = RaftNode(Config("a", election_ticks=10, pre_vote=True), random.Random(1), HardState(2, None, 10),
                    RaftLog(10, 2), snap)
    node.snapshot_not_applied_yet()
    node.step(TimeoutNow("b", "a", 2))
    assert node.role is Role.FOLLOWER and node.current_term == 2
    rd = node.ready()
    assert rd is None or not any(isinstance(m, RequestVote) for m in rd.messages)
    if rd is not None:
        node.advance(rd)
    node.snapshot_applied(10)
    node.step(TimeoutNow("b", "a", 2))
    assert node.role is Role.CANDIDATE and node.current_term == 3
    assert {m.dst for m in node.ready().messages if isinstance(m, RequestVote)} == {"b", "c"}


def test_a_node_restoring_its_snapshot_at_start_does_not_campaign_until_it_is_in_but_votes():
    """Issue 13: a node restarted on a big snapshot restores it over many drives (Runtime.restore_at_start). It
    campaigned meanwhile and won (its log is up to date), and the cluster then served nothing until its restore
    ended (30 s, bench/restart.py). It waits for the restore; it still grants votes, and campaigns once it is in."""
    membership = Membership(("a", "b", "c"))
    snap = Snapshot(10, 2, membership, b"state")
    node = RaftNode(Config("a", election_ticks=10), random.Random(1), HardState(2, None, 10), RaftLog(10, 2), snap)
    node.snapshot_not_applied_yet()
    assert node.last_applied == 0
    for _ in range(100):
        node.tick()
    assert node.role is Role.FOLLOWER and node.current_term == 2
    rd = node.ready()
    assert rd is None or not rd.messages
    if rd is not None:
        node.advance(rd)
    node.step(RequestVote("b", "a", 3, 10, 2))
    rd = node.ready()
    assert any(isinstance(m, RequestVoteReply) and m.vote_granted for m in rd.messages)
    node.advance(rd)
    node.snapshot_applied(10)
    assert node.last_applied == 10
    for _ in range(100):
        node.tick()
    assert any(isinstance(m, RequestVote) and m.src == "a" for m in node.ready().messages)  # it campaigns now


class _DrivesOf:
    """A restore_rng whose every draw is `drives`: a restart's restore of its own snapshot takes that many drives."""

    def __init__(self, drives: int) -> None:
        self.drives = drives

    def randint(self, low: int, high: int) -> int:
        return self.drives


@pytest.mark.parametrize("members_read_it", [None, False, True])
def test_a_restoring_follower_says_so_in_its_append_replies_only_where_every_member_reads_it(members_read_it):
    """Review of fastrestore2, L1': a follower whose state machine lacks its snapshot says `restoring` in its
    append replies, once Config.restoring_in_replies says every member reads the field (an old node drops a frame
    that carries it); and no more once the snapshot is in."""
    membership = Membership(("a", "b", "c"))
    read_it = None if members_read_it is None else (lambda: members_read_it)
    node = RaftNode(Config("a", election_ticks=10, restoring_in_replies=read_it), random.Random(1),
                    HardState(2, None, 10), RaftLog(10, 2), Snapshot(10, 2, membership, b"state"))
    node.snapshot_not_applied_yet()

    def reply_to_a_heartbeat() -> AppendEntriesReply:
        node.step(AppendEntries("b", "a", 2, 10, 2, (), 10, 0))
        rd = node.ready()
        node.advance(rd, snapshot_applied=True)
        [reply] = [m for m in rd.messages if isinstance(m, AppendEntriesReply)]
        return reply

    assert reply_to_a_heartbeat().restoring is bool(members_read_it)
    node.snapshot_applied(10)
    assert reply_to_a_heartbeat().restoring is False


@pytest.mark.parametrize("hand_over", ["removal", "best_successor"])
def test_a_leaders_hand_over_passes_by_a_follower_restoring_its_snapshot(hand_over):
    """Review of fastrestore2, L1': a follower restarted on its snapshot restores it by steps with its log whole, so
    a leader's hand-over (its removal's, or Server.stop's best_successor: the highest match, which ties) picked it;
    it ignores TimeoutNow while it restores, and the cluster waited the transfer and an election timeout. It says
    it restores in its append replies, and the hand-over picks the other voter, leader at once."""
    c = Cluster(seed=7, n=3)
    leader = elect(c)
    c.run(20)
    followers = sorted(i for i in c.ids if i != leader)
    other, restarted = followers  # the restarted one ties, and wins the tie by its id (the greatest)
    c.take_snapshot(restarted)
    c.crash(restarted)
    c.restore_rng = _DrivesOf(10_000)  # restores far longer than this test runs
    c.restart(restarted)
    c.run(30)  # it catches up its log while it restores
    assert c.nodes[restarted].node.status().receiving_snapshot and c.nodes[restarted].node.last_applied == 0
    old = c.nodes[leader].node
    progress = old.status().progress
    assert progress[restarted].match_index == progress[other].match_index == old.log.last_index
    assert progress[restarted].restoring and not progress[other].restoring
    if hand_over == "removal":
        assert c.change_membership(ConfChangeKind.REMOVE, leader)
        assert c.run_until(lambda: c.leader() not in (None, leader), c.election_ticks)  # within an election timeout
        assert c.leader() == other
    else:
        _stop_hands_over_to(c, leader, other)


def _leader_with_a_follower_restoring(restore_drives: int) -> tuple[Cluster, str, str]:
    """Three nodes; the follower with the greatest id restarted on its snapshot, which it restores in
    `restore_drives` drives, then 10 ticks run. Returns the cluster, its leader and that follower."""
    c = Cluster(seed=7, n=3)
    leader = elect(c)
    c.run(20)
    restarted = max(i for i in c.ids if i != leader)
    c.take_snapshot(restarted)
    c.crash(restarted)
    c.restore_rng = _DrivesOf(restore_drives)
    c.restart(restarted)
    c.run(10)
    return c, leader, restarted


def test_a_transfer_to_a_follower_restoring_its_snapshot_is_refused_by_the_core_with_nothing_started():
    """Review restoreedges-fix V1: the HTTP route refuses a target that restores (409), but a gevent switch sits
    between its check and the core's transfer_leadership, and a target that began restoring meanwhile ignored the
    TimeoutNow: the leader refused proposals until the core aborted the transfer after an election timeout. The
    core refuses it too (TargetRestoring), before anything is started: proposals go on. A target that is not a
    voter is told that first (ValueError), and once the restore ended the transfer goes ahead."""
    c, leader, restarted = _leader_with_a_follower_restoring(restore_drives=40)
    old = c.nodes[leader].node
    assert old.status().progress[restarted].restoring
    with pytest.raises(TargetRestoring, match=f"{restarted} is restoring a snapshot"):
        old.transfer_leadership(restarted)
    assert old.transferee is None
    old.propose(b"k=after-the-refusal")  # no ProposalDropped: no transfer is under way
    with pytest.raises(ValueError, match="n9 is not a voter"):
        old.transfer_leadership("n9")
    assert c.run_until(lambda: not old.status().progress[restarted].restoring, 200)
    old.transfer_leadership(restarted)
    assert old.transferee == restarted
    c.process(leader)
    assert c.run_until(lambda: c.leader() == restarted, c.election_ticks)


def _leader_with_a_snapshot_for(restore_drives: int) -> tuple[Cluster, str, str, str]:
    """3 nodes: the leader took a snapshot past the log of a follower (the installer) that was down meanwhile and
    is now to restart (the caller's filters first) and restore the snapshot over `restore_drives` drives:
    (the cluster, the leader, the other follower, the installer)."""
    c = Cluster(seed=7, n=3, config_overrides=NO_CATCH_UP)
    leader = elect(c)
    c.run(20)
    other, installer = sorted(i for i in c.ids if i != leader)
    c.crash(installer)
    for _ in range(10):
        c.client_write(leader)
    c.run(10)
    c.take_snapshot(leader)  # past the installer's log: the leader sends it the snapshot
    c.run(5)
    c.restore_rng = _DrivesOf(restore_drives)
    return c, leader, other, installer


@pytest.mark.parametrize("restore_drives", [10_000, 0])
def test_a_follower_that_installed_the_leaders_snapshot_is_taken_as_restoring_until_its_next_append_reply(
        restore_drives):
    """Review final24, L1: once a follower has installed the leader's snapshot it restores it by steps and ignores
    TimeoutNow, but the leader's Progress.restoring kept what the last append reply had said (False) until the next
    one: a transfer (the route's check and the core's) or Server.stop's hand-over (best_successor: the highest
    match, here a tie the follower wins by its id) picked it, and the cluster waited the transfer's bound and an
    election timeout. The leader takes it as restoring as soon as the install is done (here the follower's append
    replies are dropped from then on, to hold that window open); the next append reply says what is so: still
    restoring, or not (`restore_drives` 0: a restore in one go)."""
    from raftlib.server.node import best_successor  # here: the rest of this module needs no server
    c, leader, other, installer = _leader_with_a_snapshot_for(restore_drives)
    installed = []

    def drop_its_append_replies_once_installed(m):
        if m.src == installer and isinstance(m, InstallSnapshotReply) and m.done:
            installed.append(m)
        return None if installed and m.src == installer and isinstance(m, AppendEntriesReply) else m

    c.deliver_filter = drop_its_append_replies_once_installed
    c.restart(installer)
    old = c.nodes[leader].node
    assert c.run_until(
        lambda: bool(installed) and old.status().progress[installer].state is not ProgressState.SNAPSHOT, 100)
    assert (c.nodes[installer].restoring is not None) is bool(restore_drives)
    progress = old.status().progress
    assert progress[installer].match_index == progress[other].match_index == old.log.last_index
    assert progress[installer].restoring and not progress[other].restoring
    with pytest.raises(TargetRestoring, match=f"{installer} is restoring a snapshot"):
        old.transfer_leadership(installer)
    assert old.transferee is None
    assert best_successor(old.status(), c.election_ticks) == other
    c.deliver_filter = None
    c.run(2 * c.heartbeat_ticks)  # a heartbeat's reply
    assert old.role is Role.LEADER and old.status().progress[installer].restoring is bool(restore_drives)


def test_a_heartbeats_append_stepped_with_the_last_chunk_in_one_drive_still_says_restoring():
    """Review of snapdone, L1: a heartbeat to a follower in SNAPSHOT state sends the current chunk and an empty
    append together, and the runtime steps all its inbox before one Ready. With the last chunk and that append in
    one drive, the append's reply was made while the snapshot was only received (not yet marked unapplied, which
    `advance` does), so it said restoring=False and, following the install's reply, undid the leader's guess at
    once: a transfer to the restoring follower was accepted."""
    c, leader, other, installer = _leader_with_a_snapshot_for(10_000)
    held: list = []

    def hold_the_last_chunk_and_the_append_after_it(m):
        if m.dst == installer and isinstance(m, InstallSnapshot) and m.done:
            held.append(m)
            return None
        if m.dst == installer and isinstance(m, AppendEntries) and held \
                and not any(isinstance(h, AppendEntries) for h in held):
            held.append(m)
            return None
        return m

    c.deliver_filter = hold_the_last_chunk_and_the_append_after_it
    c.restart(installer)
    assert c.run_until(lambda: any(isinstance(h, AppendEntries) for h in held), 200), held
    chunk = next(h for h in held if isinstance(h, InstallSnapshot))
    append = next(h for h in held if isinstance(h, AppendEntries))
    sent: list = []
    c.deliver_filter = lambda m: sent.append(m) if m.src == installer else m  # its replies, kept in order
    follower = c.nodes[installer]
    follower.node.step(chunk)  # one drive: both stepped, then one Ready, as runtime._drive does
    follower.node.step(append)
    c.process(installer)
    c.deliver_filter = None
    assert [type(m) for m in sent] == [InstallSnapshotReply, AppendEntriesReply], sent
    old = c.nodes[leader].node
    for m in sent:  # in the order the follower sent them (one REQ socket a peer keeps its order)
        old.step(m)
    assert follower.restoring is not None
    assert old.status().progress[installer].restoring
    with pytest.raises(TargetRestoring):
        old.transfer_leadership(installer)


def test_a_removed_leaders_hand_over_passes_by_a_caught_up_voter_silent_since_its_ack_when_the_removal_commits_slowly():
    """Review restoreedges-fix Q1: the removal's hand-over (core._step_down_after_removal) prefers, of the voters
    that tie on the highest match, one heard from within an election timeout. It matters only when the removal
    commits more than an election timeout after a voter acknowledged it: here the greatest id (which wins a tie)
    acknowledges it at once and is then cut off from the leader, and the others get the entry only after 1.5
    election timeouts (the appends to them go without it, and they answer them). The hand-over
    picks one of those, which leads within an election timeout; TimeoutNow to the silent one would be lost."""
    c = Cluster(seed=7, n=5)
    leader = elect(c)
    c.run(20)
    followers = sorted(i for i in c.ids if i != leader)
    *others, silent = followers
    old = c.nodes[leader].node
    removal_index = old.log.last_index + 1
    holding = [True]

    def carry_the_removal_to_the_silent_one_only(m):  # the others get the appends, without it: they answer
        if holding[0] and isinstance(m, AppendEntries) and m.dst in others:
            return dataclasses.replace(m, entries=tuple(e for e in m.entries if e.index < removal_index))
        return m

    c.deliver_filter = carry_the_removal_to_the_silent_one_only
    assert c.change_membership(ConfChangeKind.REMOVE, leader)
    assert old.log.last_index == removal_index
    assert c.run_until(lambda: old.status().progress[silent].match_index == removal_index, 10)
    c.cut |= {(leader, silent), (silent, leader)}
    c.run(c.election_ticks + c.election_ticks // 2)
    progress = old.status().progress
    assert old.role is Role.LEADER and old.commit_index < removal_index
    assert all(progress[n].match_index < removal_index and progress[n].heard_within(c.election_ticks)
               for n in others)
    assert not progress[silent].heard_within(c.election_ticks)
    holding[0] = False
    assert c.run_until(lambda: old.role is not Role.LEADER, c.election_ticks)  # the removal committed
    assert c.run_until(lambda: c.leader() not in (None, leader), c.election_ticks)  # within an election timeout
    assert c.leader() in others


def _stop_hands_over_to(c: Cluster, leader: str, expected: str) -> None:
    """Server.stop's hand-over from `leader` (raftlib.server.node.best_successor) picks `expected`, which leads
    in less than an election timeout."""
    from raftlib.server.node import best_successor  # here: the rest of this module needs no server
    old = c.nodes[leader].node
    target = best_successor(old.status(), c.election_ticks)
    assert target == expected
    old.transfer_leadership(target)
    c.process(leader)
    assert c.run_until(lambda: c.leader() not in (None, leader), c.election_ticks)
    assert c.leader() == expected


def test_a_stopping_leaders_hand_over_passes_by_a_caught_up_follower_it_has_not_heard_from_lately():
    """Review restoreedges L3: Server.stop's hand-over picked, of the followers that tie on the highest match, the
    greatest id, even one whose messages the transport holds (it waits for a live but slow peer's late reply, up to
    ten reply timeouts): the TimeoutNow waited with them, and the cluster waited the transfer's bound and an
    election timeout. Here the leader's link with that follower drops everything for two election timeouts, with
    nothing written meanwhile: both followers stay caught up, and the hand-over picks the one it hears from."""
    c = Cluster(seed=7, n=3)
    leader = elect(c)
    c.run(20)
    other, held = sorted(i for i in c.ids if i != leader)  # the held one ties, and wins the tie by its id
    c.cut |= {(leader, held), (held, leader)}
    c.run(2 * c.election_ticks)
    old = c.nodes[leader].node
    progress = old.status().progress
    assert c.leader() == leader
    assert progress[held].match_index == progress[other].match_index == old.log.last_index
    assert progress[other].heard_within(c.election_ticks) and not progress[held].heard_within(c.election_ticks)
    _stop_hands_over_to(c, leader, other)


def test_the_leader_forgets_a_followers_restoring_once_its_restore_ends():
    """Review of fix2snap, Q1: the leader's Progress.restoring follows each append reply, so it clears once the
    follower's restore ends; a flag that stuck would keep a hand-over off that node for good (and, with one other
    voter down, off every node)."""
    from raftlib.server.node import best_successor  # here: the rest of this module needs no server
    c, leader, restarted = _leader_with_a_follower_restoring(restore_drives=30)
    assert c.nodes[leader].node.status().progress[restarted].restoring
    assert c.run_until(lambda: c.nodes[restarted].restoring is None, 100)
    c.run(2 * c.heartbeat_ticks)  # a heartbeat's reply after the restore
    assert c.nodes[restarted].node.last_applied > 0
    assert not c.nodes[leader].node.status().progress[restarted].restoring
    other = next(i for i in c.ids if i not in (leader, restarted))
    c.cut |= {(leader, other), (other, leader)}  # the restarted one gets the newest write: the hand-over's pick
    c.client_write(leader)
    c.run(6)
    assert best_successor(c.nodes[leader].node.status(), c.election_ticks) == restarted


def test_a_hand_over_passes_by_a_joiner_restoring_its_first_snapshot():
    """Review of fix2snap, L1: a joiner restores the leader's snapshot into its empty store (level 1) with no
    snapshot of its own, and is promoted meanwhile. The server's gate (Server._members_read_restoring) counted
    only a snapshot found at start, so the joiner never said `restoring`: Server.stop's best_successor picked it
    whenever its match was the highest, it ignored TimeoutNow, and the cluster waited the transfer's bound and an
    election timeout. The level of the snapshot being restored (store.restoring_level) now stands in."""
    from raftlib.server.node import Server, best_successor  # here: the rest of this module needs no server
    from raftlib.server.store import FEATURE_LEVEL, SET_FEATURE_LEVEL, KeyValueStore, command

    leaders_state = KeyValueStore()
    assert leaders_state.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL)) == "ok"
    joiners_store = KeyValueStore()
    joiners_store.restoring(leaders_state.snapshot())  # what the runtime calls as it begins the leader's snapshot
    joiner = types.SimpleNamespace(store=joiners_store)
    c = Cluster(seed=3, n=3, spares=1)
    leader = elect(c)
    for _ in range(10):
        c.client_write(leader)
    c.run(30)
    for node_id in c.ids[:3]:
        c.take_snapshot(node_id)
    c.run(10)
    c.config_overrides = {"restoring_in_replies": lambda: Server._members_read_restoring(joiner)}  # type: ignore
    c.crash("n4")
    c.restart("n4")
    c.restore_rng = _DrivesOf(10_000)  # restores far longer than this test runs
    assert c.change_membership(ConfChangeKind.ADD_LEARNER, "n4")
    assert c.run_until(lambda: "n4" in c.nodes[c.leader()].node.membership.voters
                       and c.nodes[c.leader()].node.commit_index >= c.nodes[c.leader()].node.membership_index, 300)
    c.run(10)
    leader = c.leader()
    others = [v for v in c.nodes[leader].node.membership.voters if v not in (leader, "n4")]
    for lagging in others:  # the joiner gets the newest write first (as under load: any follower may be ahead)
        c.cut |= {(leader, lagging), (lagging, leader)}
    c.client_write(leader)
    c.run(6)
    c.cut.clear()
    old = c.nodes[leader].node
    progress = old.status().progress
    assert c.nodes["n4"].restoring is not None and c.nodes["n4"].node.last_applied == 0
    assert all(progress["n4"].match_index > progress[other].match_index for other in others)
    assert progress["n4"].restoring
    target = best_successor(old.status(), c.election_ticks)
    assert target in others
    old.transfer_leadership(target)
    c.process(leader)
    assert c.run_until(lambda: c.leader() not in (None, leader), c.election_ticks)  # less than an election timeout
    assert c.leader() == target


def _record_sent_to(c: Cluster, follower: str, kind: type = AppendEntries) -> list:
    """From now on, the list of the messages of `kind` (AppendEntries, InstallSnapshot) sent to `follower` (before
    any loss or filter)."""
    sent: list = []
    send = c.send

    def recording_send(m) -> None:
        if isinstance(m, kind) and m.dst == follower:
            sent.append(m)
        send(m)

    c.send = recording_send  # type: ignore[method-assign]
    return sent


def _follower_behind_a_snapshot(c: Cluster,
                                before_pause: Callable[[str, str], None] | None = None) -> tuple[str, str, Progress]:
    """Elect a leader (a window of one append), stop a follower once it replicates (`before_pause(leader,
    follower)` first), write and snapshot past it: (leader, follower, the leader's progress of it). The follower is
    left paused."""
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    if before_pause is not None:
        before_pause(leader, follower)
    pr = c.nodes[leader].node.progress(follower)
    assert pr is not None and c.run_until(lambda: pr.state is ProgressState.REPLICATE, 50)
    c.pause(follower)
    for _ in range(5):
        write(c)
    c.take_snapshot(leader)
    return leader, follower, pr


def _replicating_follower_stopped(c: Cluster) -> tuple[str, str, Progress, list]:
    """Elect a leader, wait until a follower replicates, record the appends sent to it from then on, and stop it
    (paused): (leader, follower, the leader's progress of it, the appends recorded)."""
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    pr = c.nodes[leader].node.progress(follower)
    assert pr is not None and c.run_until(lambda: pr.state is ProgressState.REPLICATE, 50)
    appends = _record_sent_to(c, follower)
    c.pause(follower)
    return leader, follower, pr, appends


def test_a_full_window_holds_back_new_entries_to_a_stopped_follower_but_not_its_heartbeats():
    """etcd-io/raft's MaxInflightMsgs: a stopped follower (SIGSTOP) was sent every new batch, all of them held by the
    transport for it in the leader's memory. With at most two appends in flight, the writes commit on the others
    while heartbeats (empty appends, read rounds) still go to it; resumed, it answers, and catches up."""
    c = Cluster(seed=5, n=3, config_overrides={"max_inflight_messages": 2})
    leader, follower, pr, appends = _replicating_follower_stopped(c)
    for _ in range(8):
        write(c)
        c.run(3)  # heartbeats go while writes come
    assert len([m for m in appends if m.entries]) == 2
    assert pr.window_full(2, 1 << 30) and pr.next_index <= c.nodes[leader].node.log.last_index
    heartbeats_while_full = [m for m in appends[appends.index([m for m in appends if m.entries][-1]) + 1:]
                             if not m.entries and m.read_round]
    assert len(heartbeats_while_full) >= 5
    c.resume(follower)
    assert c.run_until(lambda: c.nodes[follower].node.commit_index == c.nodes[leader].node.commit_index, 100)


@pytest.mark.parametrize("max_batch_bytes", [Config.max_batch_bytes, 64 << 10])
def test_a_full_window_holds_eight_full_batches_whatever_the_batch_bound(max_batch_bytes):
    """The window's bytes go by the batch bound (Config.inflight_bytes_bound: 8 batches, 2 MiB by default): a fixed
    8 MiB was 32 batches of 256 KiB queued ahead of a catching-up follower's heartbeats, ~1 s round trips over a
    20 ms link (review final28, L2). 4 MiB written while a follower is stopped: at most 8 batches go to it, and
    the append that crosses the bound (soft)."""
    c = Cluster(seed=5, n=3, config_overrides={"max_batch_bytes": max_batch_bytes})
    leader, follower, _, appends = _replicating_follower_stopped(c)
    for k in range(400):
        assert c.client_write(leader, f"key{k}", value="v" * 10_000) is not None
    assert c.run_until(lambda: c.nodes[leader].node.commit_index >= 400, 2000)
    sent = [sum(e.size() for e in m.entries) for m in appends if m.entries]
    assert c.nodes[leader].node.config.inflight_bytes_bound == 8 * max_batch_bytes
    assert 7 * max_batch_bytes < sum(sent) <= 8 * max_batch_bytes + max(sent), (sum(sent), len(sent))
    c.resume(follower)
    assert c.run_until(lambda: c.nodes[follower].node.commit_index == c.nodes[leader].node.commit_index, 2000)


def test_a_full_window_whose_appends_were_all_lost_recovers_at_the_next_heartbeat():
    """The REQ/REP transport drops a whole batch when a reply times out: every append in the window may be lost,
    and no acknowledgement will ever free it. The next heartbeat, at prev_log_index next_index - 1, is rejected by
    the follower (it lacks those entries); the leader backs off to PROBE, which empties the window, and the entries
    go again (Progress.window_full)."""
    c = Cluster(seed=6, n=3, config_overrides={"max_inflight_messages": 2})
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    n = c.nodes[leader].node
    pr = n.progress(follower)
    assert pr is not None and c.run_until(lambda: pr.state is ProgressState.REPLICATE, 50)
    c.deliver_filter = lambda m: None if isinstance(m, AppendEntries) and m.dst == follower else m  # heartbeats too
    for _ in range(4):
        write(c)
    assert pr.window_full(2, 1 << 30) and c.nodes[follower].node.log.last_index < n.log.last_index
    c.deliver_filter = None
    states: list = []
    assert c.run_until(lambda: (states.append(pr.state), c.nodes[follower].node.log.last_index == n.log.last_index)[1],
                       3 * c.heartbeat_ticks + 10)
    assert ProgressState.PROBE in states and pr.state is ProgressState.REPLICATE and not pr.inflight


def test_a_stopped_follower_is_sent_the_snapshots_current_chunk_once_not_at_every_heartbeat():
    """Each heartbeat sent a follower in SNAPSHOT the current chunk again, in case it was lost: a stopped follower
    (SIGSTOP) answers nothing, and a chunk per heartbeat (1 MiB each, 20 a second) was queued for it in the leader's
    memory for as long as it was stopped. The chunk goes again only once the follower was heard from since the last
    (Progress.chunk_unanswered); heartbeats still go; resumed, it answers and the transfer completes."""
    c = Cluster(seed=7, n=3, config_overrides={"max_inflight_messages": 1, **NO_CATCH_UP})
    leader, follower, pr = _follower_behind_a_snapshot(c)
    appends = _record_sent_to(c, follower)
    chunks = _record_sent_to(c, follower, InstallSnapshot)
    c.run(10 * c.heartbeat_ticks)
    assert pr.state is ProgressState.SNAPSHOT and pr.chunk_unanswered
    assert len(chunks) == 1 and len([m for m in appends if m.read_round]) >= 9
    c.resume(follower)
    n = c.nodes[leader].node
    assert c.run_until(lambda: c.nodes[follower].node.commit_index == n.commit_index
                       and pr.state is ProgressState.REPLICATE, 200)


def test_a_follower_receiving_a_snapshot_is_sent_its_chunk_again_once_a_heartbeat_not_at_every_read_round():
    """A read round goes out as a heartbeat does, but it is not one: a live follower in SNAPSHOT, answering every
    round's empty append, was sent the current chunk again after each answered read round, one chunk a round trip
    under read load instead of one a heartbeat. Its chunks lost here, the transfer stays at its first one while
    reads come at every tick: the chunk goes again once a heartbeat, and the read rounds are still confirmed."""
    c = Cluster(seed=7, n=3, config_overrides={"max_inflight_messages": 1, **NO_CATCH_UP})
    leader, follower, pr = _follower_behind_a_snapshot(c)
    c.deliver_filter = lambda m: None if isinstance(m, InstallSnapshot) and m.dst == follower else m
    c.resume(follower)
    assert c.run_until(lambda: pr.state is ProgressState.SNAPSHOT, 50)
    appends = _record_sent_to(c, follower)
    chunks = _record_sent_to(c, follower, InstallSnapshot)
    heartbeats = 10
    for _ in range(heartbeats * c.heartbeat_ticks):
        c.client_read(leader, lease=False)
        c.process(leader)
        c.run(1)
    read_rounds = {m.read_round for m in appends if m.read_round}
    assert pr.state is ProgressState.SNAPSHOT and len(read_rounds) > 2 * heartbeats
    assert 1 <= len(chunks) <= heartbeats + 1


def _entries_known(n: RaftNode) -> list[tuple[int, int, bytes]]:
    """(index, term, data) of the entries a node holds in memory: those kept behind its snapshot's cut, then its log."""
    first, count, _ = n.catch_up_entries
    kept = [(e.index, e.term, e.data) for e in n._catch_up] if count else []
    assert not kept or (kept[0][0], len(kept)) == (first, count)
    return kept + [(e.index, e.term, e.data) for e in n.log.slice(n.log.first_index, n.log.last_index + 1)]


@pytest.mark.parametrize("overrides, from_behind_the_cut", [
    ({}, True),  # the default: 5,000 entries, 8 MiB
    # The follower's next index is 4 entries behind the cut (cut - 3): N kept serve N positions (review of cu, Q4).
    ({"snapshot_catch_up_entries": 4}, True),
    ({"snapshot_catch_up_entries": 3}, False),  # one more than are served
    ({"snapshot_catch_up_bytes": 2 * 30}, False),  # ~two writes by their bytes (Entry.size of `k=vN`: ~30)
    (NO_CATCH_UP, False),  # 0 turns it off
    ({"snapshot_catch_up_bytes": 0}, False),
])
def test_a_follower_a_few_entries_behind_a_snapshot_is_sent_appends_from_behind_the_cut_within_the_bounds(
        overrides, from_behind_the_cut):
    """etcd's SnapshotCatchUpEntries: a follower whose next index lies among the entries the leader kept behind its
    snapshot's cut is sent ordinary appends from them, not the snapshot, and its log ends up equal to the leader's;
    behind by more than the bounds keep (by count or by bytes), or with them 0, it is sent the snapshot (§7)."""
    c = Cluster(seed=7, n=3, config_overrides={"max_inflight_messages": 1, **overrides})
    leader, follower, pr = _follower_behind_a_snapshot(c)
    n = c.nodes[leader].node
    assert pr.next_index <= n.log.snapshot_index, "the follower is not behind the cut"
    appends = _record_sent_to(c, follower)
    chunks = _record_sent_to(c, follower, InstallSnapshot)
    c.resume(follower)
    f = c.nodes[follower].node
    assert c.run_until(lambda: f.commit_index == n.commit_index == f.log.last_index == n.log.last_index
                       and pr.state is ProgressState.REPLICATE, 300)
    behind_the_cut = [m for m in appends if m.entries and m.prev_log_index < n.log.snapshot_index]
    assert bool(behind_the_cut) == from_behind_the_cut and bool(chunks) != from_behind_the_cut, (behind_the_cut,
                                                                                                 chunks)
    assert n.catch_up_appends == len(behind_the_cut)
    if from_behind_the_cut:
        known = _entries_known(n)
        assert f.log.snapshot_index == 0 and _entries_known(f)[-len(known):] == known
        assert overrides or known[0][0] == 1, "the leader kept every entry behind its cut (12 of 5,000)"
    else:
        assert f.log.snapshot_index == n.log.snapshot_index and f.catch_up_entries == (0, 0, 0)
    assert c.nodes[follower].kv.data == c.nodes[leader].kv.data


def test_appends_from_behind_the_cut_are_bounded_by_max_batch_bytes_so_a_follower_behind_big_writes_catches_up():
    """A batch from the entries kept behind the cut is bounded by max_batch_bytes as one from the log is (within_bytes,
    review of cu, Q1): unbounded, a follower stopped while the leader took 100 writes of 64 KiB was sent one append
    of 4.4 MB from them, which the codec refuses (over MAX_FRAME_BYTES, 4 MiB), and it never caught up."""
    c = Cluster(seed=7, n=3)
    leader = elect(c)
    follower = next(i for i in c.ids if i != leader)
    n, f = c.nodes[leader].node, c.nodes[follower].node
    pr = n.progress(follower)
    assert pr is not None and c.run_until(lambda: pr.state is ProgressState.REPLICATE, 50)
    c.pause(follower)
    for k in range(100):
        write(c, f"k{k % 5}", value="v" * (64 << 10))
    c.take_snapshot(leader)
    first, _, kept_bytes = n.catch_up_entries
    assert first <= pr.next_index <= n.log.snapshot_index and kept_bytes > codec.MAX_FRAME_BYTES
    appends = _record_sent_to(c, follower)
    c.resume(follower)
    assert c.run_until(lambda: f.commit_index == n.commit_index == f.log.last_index == n.log.last_index, 500)
    behind_the_cut = [m for m in appends if m.entries and m.prev_log_index < n.log.snapshot_index]
    assert len(behind_the_cut) > 1 and f.log.snapshot_index == 0
    for m in appends:
        assert len(m.entries) == 1 or sum(e.size() for e in m.entries) <= n.config.max_batch_bytes, m.prev_log_index


def test_the_entries_kept_behind_cuts_are_the_newest_within_both_bounds_and_span_several_snapshots():
    """create_snapshot keeps the newest entries up to its index, contiguous with those kept behind the previous
    cut, never more than snapshot_catch_up_entries + 1 (N positions
    served, and the entry before them for its term) nor over snapshot_catch_up_bytes (by Entry.size)."""
    value = "v" * 100
    bytes_bound = 5 * 130  # about five writes of `value` (Entry.size: data + 24)
    c = Cluster(seed=7, n=3, config_overrides={"snapshot_catch_up_entries": 12, "snapshot_catch_up_bytes": bytes_bound})
    leader = elect(c)
    n = c.nodes[leader].node

    def write_and_snapshot(writes: int) -> None:
        for _ in range(writes):
            write(c, value=value)
        assert c.run_until(lambda: n.last_applied == n.log.last_index, 200)
        c.take_snapshot(leader)

    write_and_snapshot(1)
    first, count, _ = n.catch_up_entries
    assert (first, count) == (1, n.log.snapshot_index)  # every entry: few and small
    write_and_snapshot(8)  # the kept entries now span both cuts, then reach the byte bound
    first, count, kept_bytes = n.catch_up_entries
    kept = n._catch_up
    assert [e.index for e in kept] == list(range(first, n.log.snapshot_index + 1)) and count == len(kept)
    biggest = max(e.size() for e in kept)
    assert kept_bytes == sum(e.size() for e in kept) and bytes_bound - biggest < kept_bytes <= bytes_bound
    assert 1 < first and count < 12 + 1

    c = Cluster(seed=7, n=3, config_overrides={"snapshot_catch_up_entries": 3})
    leader = elect(c)
    n = c.nodes[leader].node
    write_and_snapshot(6)
    # Three follower positions served (next index cut - 2 to the cut), and the entry before them for its term.
    assert n.catch_up_entries[:2] == (n.log.snapshot_index - 3, 4)


def test_a_node_that_installs_a_leaders_snapshot_keeps_no_entries_behind_a_cut_and_a_restart_keeps_none():
    """The entries kept behind a cut are in memory only, and contiguous up to the node's snapshot: a leader's
    snapshot installed replaces the log, and they go with it; a restarted node starts with none."""
    c = Cluster(seed=7, n=3, config_overrides={"max_inflight_messages": 1, "snapshot_catch_up_entries": 3})

    def snapshot_on_the_follower(leader: str, follower: str) -> None:
        write(c)
        f = c.nodes[follower].node
        assert c.run_until(lambda: f.last_applied == c.nodes[leader].node.log.last_index, 200)
        c.take_snapshot(follower)
        assert f.catch_up_entries[1] > 0

    leader, follower, pr = _follower_behind_a_snapshot(c, snapshot_on_the_follower)
    f = c.nodes[follower].node
    chunks = _record_sent_to(c, follower, InstallSnapshot)
    c.resume(follower)
    n = c.nodes[leader].node
    assert c.run_until(lambda: f.log.snapshot_index == n.log.snapshot_index and f.commit_index == n.commit_index, 300)
    assert chunks and f.catch_up_entries == (0, 0, 0)
    assert n.catch_up_entries[1] == 3 + 1
    c.crash(leader)
    c.restart(leader)
    assert c.nodes[leader].node.catch_up_entries == (0, 0, 0)


def test_a_core_assert_in_a_snapshots_commit_fails_the_schedule_as_a_safety_violation_with_its_replay(monkeypatch):
    """Review cu2, Q3: the simulator turned the core's asserts into a SafetyViolation (the trace and the replay
    command) only while stepping a message; one raised in a snapshot's commit escaped as a bare AssertionError,
    which tests/test_mutations.py does not count as a catch. Broken as the review's variant MC (a leader's
    snapshot installed leaves the entries kept behind the node's old cut), the node's next snapshot of its own
    asserts in create_snapshot (they no longer end at its cut): a SafetyViolation naming the commit."""
    install = RaftNode._restore

    def keeping_the_old_cuts_entries(self: RaftNode, snap: Snapshot, sink=None) -> None:
        kept = self._catch_up, self._catch_up_bytes
        install(self, snap, sink)
        self._catch_up, self._catch_up_bytes = kept

    monkeypatch.setattr(RaftNode, "_restore", keeping_the_old_cuts_entries)
    c = Cluster(seed=7, n=3, config_overrides={"max_inflight_messages": 1, "snapshot_catch_up_entries": 3})

    def snapshot_on_the_follower(leader: str, follower: str) -> None:
        write(c)
        assert c.run_until(lambda: c.nodes[follower].node.last_applied == c.nodes[leader].node.log.last_index, 200)
        c.take_snapshot(follower)

    leader, follower, _ = _follower_behind_a_snapshot(c, snapshot_on_the_follower)
    f, n = c.nodes[follower].node, c.nodes[leader].node
    c.resume(follower)
    assert c.run_until(lambda: f.log.snapshot_index == n.log.snapshot_index and f.commit_index == n.commit_index, 300)
    assert f.catch_up_entries[1] and f.catch_up_entries[0] + f.catch_up_entries[1] - 1 < f.log.snapshot_index
    write(c)
    assert c.run_until(lambda: f.last_applied == n.log.last_index, 200)
    with pytest.raises(SafetyViolation) as caught:
        c.take_snapshot(follower)
    why = str(caught.value)
    assert why.startswith(f"{follower}: the core's assertion failed committing a snapshot (create_snapshot): core.py:")
    assert f"replay: {c.replay_command}" in why

def test_an_old_leaders_uncommitted_tail_of_a_term_the_cut_passed_is_replaced_by_appends_from_behind_the_cut():
    """Review cu2, L1: a follower that an earlier leader left with uncommitted entries of its term rejects with
    that conflict term and the first index of its run of it. The leader looked the term up in its log only, which
    starts after its cut: not found there, it probed from the run's start, below the entries it kept behind the
    cut, and sent the whole snapshot. Looked up among the kept entries too, the probe lands just after the term's
    last kept entry, and the old leader is sent appends from them, never a snapshot chunk."""
    c = Cluster(seed=7, n=3, config_overrides={"snapshot_catch_up_entries": 16})
    old = elect(c)
    o = c.nodes[old].node
    for _ in range(30):  # committed entries of the old leader's term: a long run of it
        write(c)
    old_term, committed = o.current_term, o.commit_index
    c.isolate(old)
    for _ in range(3):  # its uncommitted tail, same term
        assert c.client_write(old, "k", redirect=False) is not None
    c.process(old)
    assert o.log.last_index == committed + 3 and o.log.term(o.log.last_index) == old_term
    assert c.run_until(lambda: c.leader() not in (None, old), 1000)
    middle = c.leader()
    assert middle is not None
    for _ in range(5):
        write(c)
    new = next(i for i in c.ids if i not in (old, middle))
    n = c.nodes[new].node
    for i in (middle, new):
        assert c.run_until(lambda: c.nodes[i].node.last_applied == c.nodes[middle].node.log.last_index, 100)
        c.take_snapshot(i)
    c.nodes[middle].node.transfer_leadership(new)  # any election after the cut: next_index starts past the old log
    c.process(middle)
    assert c.run_until(lambda: c.leader() == new, 300)
    write(c)
    first_kept, count, _ = n.catch_up_entries
    assert first_kept <= committed < n.log.snapshot_index < first_kept + count, "the kept entries cover the divergence"
    assert n.log.last_index_of_term(old_term) == 0, "the cut passed the old leader's term"
    rejections: list[AppendEntriesReply] = []
    send = c.send

    def recording_send(m) -> None:
        if isinstance(m, AppendEntriesReply) and m.src == old and not m.success:
            rejections.append(m)
        send(m)

    c.send = recording_send  # type: ignore[method-assign]
    appends = _record_sent_to(c, old)
    chunks = _record_sent_to(c, old, InstallSnapshot)
    c.heal()
    assert c.run_until(lambda: o.commit_index == n.commit_index and o.log.last_index == n.log.last_index, 1000)
    assert any(m.conflict_term == old_term and m.conflict_index < first_kept for m in rejections), rejections
    assert not chunks and o.log.snapshot_index == 0
    assert [m for m in appends if m.entries and m.prev_log_index < n.log.snapshot_index]
    known = _entries_known(n)
    assert _entries_known(o)[-len(known):] == known  # its tail replaced by the leader's entries
    assert c.nodes[old].kv.data == c.nodes[new].kv.data


def test_appends_from_behind_the_cut_across_a_term_change_carry_each_entrys_own_term_as_the_previous_term():
    """The entries kept behind a cut span two terms (a leader change before the snapshot), and a follower stopped
    in the first term is behind the term boundary: its catch-up appends from them carry as prev_log_term the term
    of the kept entry at prev_log_index (the first term), not the snapshot's (the second), and it is accepted at
    once, with no snapshot. With the snapshot's term (review cu2, variant MA), every such append was rejected, and
    it took the random schedules' liveness check to notice."""
    c = Cluster(seed=7, n=3, config_overrides={"max_inflight_messages": 1})
    first = elect(c)
    follower = next(i for i in c.ids if i != first)
    second = next(i for i in c.ids if i not in (first, follower))
    pr = c.nodes[first].node.progress(follower)
    assert pr is not None and c.run_until(lambda: pr.state is ProgressState.REPLICATE, 50)
    c.pause(follower)
    for _ in range(3):
        write(c)
    first_term = c.nodes[first].node.current_term
    c.nodes[first].node.transfer_leadership(second)
    c.process(first)
    assert c.run_until(lambda: c.leader() == second, 300)
    n = c.nodes[second].node
    for _ in range(3):
        write(c)
    assert c.run_until(lambda: n.last_applied == n.log.last_index, 100)
    c.take_snapshot(second)
    f = c.nodes[follower].node
    assert {first_term, n.current_term} <= {e.term for e in n._catch_up}, "the kept entries span two terms"
    assert n.log.snapshot_term == n.current_term > first_term == f.log.last_term
    assert n.catch_up_entries[0] <= f.log.last_index < n.log.snapshot_index
    appends = _record_sent_to(c, follower)
    chunks = _record_sent_to(c, follower, InstallSnapshot)
    rejections: list[AppendEntriesReply] = []
    send = c.send

    def recording_send(m) -> None:
        if isinstance(m, AppendEntriesReply) and m.src == follower and not m.success:
            rejections.append(m)
        send(m)

    c.send = recording_send  # type: ignore[method-assign]
    c.resume(follower)
    assert c.run_until(lambda: f.commit_index == n.commit_index and f.log.last_index == n.log.last_index, 300)
    across = [m for m in appends if m.entries and m.prev_log_index < n.log.snapshot_index
              and m.prev_log_term == first_term and m.entries[-1].term == n.current_term]
    assert across, [(m.prev_log_index, m.prev_log_term, len(m.entries)) for m in appends]
    assert not [m for m in rejections if m.conflict_term], rejections  # never refused at an entry it holds
    assert not chunks and f.log.snapshot_index == 0
    known = _entries_known(n)
    assert _entries_known(f)[-len(known):] == known
