"""Seeded random schedules over 3-, 5- and 7-node simulated clusters (tests/simulator.py: DiskStorage on a
simulated disk, crashes inside saves and snapshot installs, pauses with backlogs, long delays, links held for 1-10
election timeouts then released in a burst, drifting clocks),
with safety checked after every step, liveness after healing and the clients' history by the linearizability
checker. `--sim-seeds N` runs N schedules; a failure prints the command that replays it
(`python tests/simulator.py --seed S --size N`). The mutation table is tests/test_mutations.py."""

from __future__ import annotations

import collections
import dataclasses

import pytest

import simulator
from raftlib import Config, RaftNode, TargetRestoring
from simulator import SafetyViolation, random_schedule

SIZES = (3, 5, 7)
CHUNK = 60


def _chunks(total: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]


def schedules_run(start: int, stop: int, mutation: str | None = None) -> dict:
    """Schedules start .. stop-1 (schedule k runs seed k // 3 on a cluster of SIZES[k % 3] nodes): what they
    exercised. A background job (tests/background.py): a failing schedule raises SafetyViolation with its replay
    command. `mutation`: a deliberately broken core from simulator.MUTATIONS (tests of the mechanism)."""
    reads = writes = 0
    faults: collections.Counter = collections.Counter()
    for k in range(start, stop):
        cluster = random_schedule(k // 3, SIZES[k % 3], mutation=mutation)
        reads += cluster.reads_checked
        writes += len(cluster.acked_writes)
        faults.update(cluster.stats)
    return {"schedules": [start, stop], "reads": reads, "writes": writes, "faults": dict(faults)}


def pytest_generate_tests(metafunc):
    if "schedule_range" in metafunc.fixturenames:
        total = metafunc.config.getoption("--sim-seeds")
        metafunc.parametrize("schedule_range", [
            pytest.param(r, id=f"{r[0]}-{r[1]}", marks=pytest.mark.background(schedules_run, *r))
            for r in _chunks(total)
        ])


# What the bursts of held links (Cluster.hold) met at their receivers: a term, snapshot or configuration that moved
# since the messages were sent, and appends whose prev index the receiver's snapshot has cut.
HELD = (
    "held messages delivered after a term change", "held messages delivered after a snapshot",
    "held messages delivered after a configuration change", "held appends below the receiver's snapshot delivered",
)
# The faults every full chunk of schedules must have made happen (Cluster.stats), so that a change that quietly
# turns one off fails here. (A crash inside a snapshot install sent by the leader is rarer: ~1 in 75 schedules.)
FAULTS = (
    "crash before save", "crash mid save", "crash after save", "crash after send", "crash inside a save",
    "crash inside a snapshot", "crash inside a recovery", "power failures", "process kills",
    "messages lost in a crash", "long delays", "messages read after a pause", "batched drives",
    # A commit overtaken by a leader's snapshot ("snapshot overtaken by a leader's" in the stats) is reached in only
    # 11 of 20 chunks: not required.
    # A leader's snapshot restored over several drives (advance(rd, snapshot_applied=False), then
    # snapshot_applied), as the runtime restores a big state: 11 to 64 in each of the first 20 chunks.
    "snapshot restored over several drives",
    # A restart's own snapshot restored over several drives (snapshot_not_applied_yet, the KV empty until the swap),
    # as Runtime.restore_at_start does (review of fastrestore2, Q-a).
    "own snapshot restored at start over several drives",
    # A leader's proposals refused at Config.max_uncommitted_bytes: in 20 to 26 of the 60 schedules of each of the
    # first 4 chunks.
    "proposals refused at max_uncommitted_bytes",
    # A committed backlog applied a capped piece per drive (Config.max_committed_*_per_ready, small in 3 of 7
    # schedules; the runtime applies pieces for up to APPLY_DRIVE_SECONDS of CPU a drive, the simulator one, its
    # slowest case): in 31 of the 60 schedules of the first chunk.
    "apply backlog left for the next drive",
    # Held links (Cluster.hold, half the schedules): bursts, and held messages delivered after a term change, in
    # every chunk; the rest of HELD over the whole run only (RUN_FAULTS).
    "held bursts", HELD[0],
    # A leader's window of appends in flight to a follower full (Config.max_inflight_*, small in 3 of 7 schedules).
    "appends held back by a full in-flight window",
    # An append cut by its entry count (Config.max_batch_entries, two or three in 2 of 6 schedules).
    "appends cut at max_batch_entries",
    # Appends sent to a follower from the entries kept behind a snapshot's cut (Config.snapshot_catch_up_*, kept in
    # 4 of 6 schedules): in 247 of the 1,500 schedules of seeds 0-499.
    "appends sent from behind a snapshot's cut",
)
# The faults required over the whole run only (the full chunks of one session, at least two of them): a forked
# snapshot's child killed comes ~4 times a chunk of 60, as few as once, so a change to the schedules could leave a
# chunk without one (review of perf, finding 3); over the 33 chunks of CI ~135. Its handling has a directed test
# (test_a_snapshot_child_killed_in_its_file_is_dropped_and_the_node_snapshots_again).
# An append arriving below its receiver's snapshot, in a held burst, comes in ~5 of 60 schedules that hold links (a
# quarter of them in a chunk; test_held_bursts_... requires it over the schedules it runs); held messages delivered
# after a configuration change or after a snapshot are missing from 1 chunk of 60 in 5 (configuration changes are
# rare outside the churn profile; review final25, T1: 7 of 33 chunks failed when every chunk required them).
# A new cluster's lone voter (n1 of a grow schedule) leading at its first tick, as RaftNode does for a start passed
# `bootstrapped` (review rv3, T2: nothing noticed the first-tick campaign turned off): a seed grows in 1 of 5, its
# three sizes together, so a chunk (20 seeds) has none about 1 time in 90; the first 5 chunks had 3, 12, 18, 12, 15.
RUN_FAULTS = ("snapshot child killed", *HELD[1:], "bootstrapped lone voter led at its first tick")


@pytest.fixture(scope="module")
def run_faults():
    """The faults of the module's full chunks, checked against RUN_FAULTS once they have all run."""
    counted = {"chunks": 0, "faults": collections.Counter()}
    yield counted
    if counted["chunks"] >= 2:
        missing = [f for f in RUN_FAULTS if not counted["faults"][f]]
        assert not missing, f"{missing} never made in {counted['chunks']} chunks of {CHUNK} schedules"


def test_random_schedules(schedule_range, run_faults, background_result):
    """The chunk's schedules (schedules_run), run in a background worker while the rest of the suite runs."""
    start, stop = schedule_range
    run = background_result()
    assert run["schedules"] == [start, stop]
    reads, writes, faults = run["reads"], run["writes"], collections.Counter(run["faults"])
    assert writes > 0 and reads > 0, "the schedules exercised no client traffic"
    if stop - start == CHUNK:
        assert not [f for f in FAULTS if not faults[f]], f"faults never made: {faults}"
        run_faults["chunks"] += 1
        run_faults["faults"].update(faults)


def test_a_snapshot_child_killed_in_its_file_is_dropped_and_the_node_snapshots_again():
    """The runtime's forked child killed at each of its file operations (take_snapshot: half the time only the
    child dies, else the machine): the node goes on without that snapshot and without its *.tmp, takes the next
    one, and recovers from its disk after a crash with the same state as the others."""
    c = simulator.Cluster(seed=21, n=3)
    assert c.run_until(lambda: c.leader() is not None, 1000)
    node_id = next(i for i in c.ids if i != c.leader())
    sn = c.nodes[node_id]

    def applied_past_its_snapshot() -> bool:  # a write the node applied: something for take_snapshot to take
        assert c.run_until(lambda: c.leader() is not None, 1000) and sn.alive
        leader = c.nodes[c.leader()].node
        c.client_write(leader.node_id)
        written = leader.log.last_index
        return c.run_until(lambda: sn.node.last_applied >= written > sn.node.log.snapshot_index, 300)

    for op in range(simulator.WRITE_SNAPSHOT_OPS):
        for _ in range(30):  # the coin of take_snapshot: 2**-30 that it never kills the child alone
            assert applied_past_its_snapshot()
            kills, snapshot_index = c.stats["snapshot child killed"], sn.node.log.snapshot_index
            c.take_snapshot(node_id, crash_at_op=op, commit_now=False)
            if c.stats["snapshot child killed"] > kills:
                break
            assert not sn.alive  # the machine died in it instead: again, after a restart
            c.restart(node_id)
        else:
            raise AssertionError(f"no child killed alone at file operation {op} in 30 tries")
        assert sn.alive and sn.forked is None and sn.node.log.snapshot_index == snapshot_index
        assert not [f for f in sn.storage.fs.listdir(simulator.DATA_DIR) if f.endswith(".tmp")]
        c.check_safety()
    assert applied_past_its_snapshot()
    c.take_snapshot(node_id)  # the next one, not killed
    taken = sn.node.log.snapshot_index
    assert taken == sn.node.last_applied > 0
    c.crash(node_id)
    c.restart(node_id)
    assert sn.node.log.snapshot_index >= taken
    simulator.check_liveness(c, 1000)
    assert all(c.nodes[i].kv.data == sn.kv.data for i in c.ids)


def test_the_history_checker_alone_catches_stale_reads(monkeypatch):
    """Without the quick per-read check, the end-of-schedule linearizability check still catches a core that
    answers reads without a quorum (the seed test_mutations finds first), and passes the same schedule without it."""
    monkeypatch.setattr(simulator.Cluster, "check_reads_at_once", False)
    caught = None
    for k in range(135):  # read_without_quorum's budget in test_mutations (the first catch is at 46)
        try:
            random_schedule(k // 3, SIZES[k % 3], mutation="read_without_quorum", profile="isolation", holds=False)
        except SafetyViolation as e:
            caught = k
            assert "linearizability (history checker)" in str(e).splitlines()[0], str(e).splitlines()[0]
            break
    assert caught is not None, "the history checker caught no stale read in 135 schedules"
    random_schedule(caught // 3, SIZES[caught % 3], profile="isolation", holds=False)


def test_a_snapshot_written_at_commit_time_but_labelled_with_the_forks_index_is_caught(monkeypatch):
    """snapfork review, finding 4: the simulated KV's SETs are idempotent, so a snapshot holding the state of a
    later index than its own restored to a state that looked right. Its data now carries the index it was taken
    at, checked on restore. Mutation: the commit writes the state as it is at commit time (after more entries were
    applied) under the fork's index, which a forked child must never do."""
    original = simulator.Cluster.finish_snapshot

    def commit_time_state(self, node_id):
        sn = self.nodes[node_id]
        if sn.forked is not None:
            snap, tmp, crash = sn.forked
            if sn.kv.applied_index > snap.last_included_index:  # the file written again, with today's state
                sn.storage.storage.abort_snapshot(tmp)
                snap = dataclasses.replace(snap, data=sn.kv.snapshot_bytes())
                tmp = sn.storage.write_snapshot(snap, crash_at_op=None)
            sn.forked = (snap, tmp, crash)
        original(self, node_id)

    monkeypatch.setattr(simulator.Cluster, "finish_snapshot", commit_time_state)
    caught = None
    for k in range(30):
        try:
            random_schedule(k // 3, SIZES[k % 3])
        except SafetyViolation as e:
            caught = str(e)
            break
    assert caught is not None and "holds the state at index" in caught, caught


def test_a_schedules_transfer_takes_only_target_restoring_as_a_refusal_and_counts_it(monkeypatch):
    """Review final24, Q1: the schedules' `transfer` action swallowed every exception transfer_leadership raised, so
    a bug raised there passed unseen. It takes TargetRestoring (the one refusal a leader's transfer to one of its
    voters can meet) and counts it; anything else fails the schedule. Schedule 5 at 3 nodes without holds and with
    the default max_batch_entries (the schedule it gave before holds and counted batch cuts came) tries transfers."""
    as_before = {"max_batch_entries": Config.max_batch_entries}
    def refused(self: RaftNode, target: str) -> None:
        raise TargetRestoring(target)

    monkeypatch.setattr(RaftNode, "transfer_leadership", refused)
    assert random_schedule(5, 3, holds=False, config_overrides=as_before).stats[
        "transfers refused: the target restores"] >= 1

    def broken(self: RaftNode, target: str) -> None:
        raise KeyError(target)

    monkeypatch.setattr(RaftNode, "transfer_leadership", broken)
    with pytest.raises(KeyError):
        random_schedule(5, 3, holds=False, config_overrides=as_before)


def test_held_bursts_reach_nodes_whose_term_snapshot_and_configuration_moved():
    """The hold fault (review T3: messages held for many election timeouts, then delivered at once) is not vacuous:
    in the CI's schedules with holds on, bursts reach nodes after their term, snapshot and configuration moved on,
    and appends arrive below the receiver's snapshot, all within 60 schedules (22 today: an append below the
    snapshot is the rarest, ~5 schedules in 60); and a schedule with holds replays exactly from its seed (the
    bursts' order and duplicates included)."""
    stats: collections.Counter = collections.Counter()
    for k in range(60):
        stats.update(random_schedule(k // 3, SIZES[k % 3], holds=True).stats)
        if all(stats[f] for f in HELD):
            break
    assert stats["held bursts"] > 0 and stats["held messages delivered"] > 0, stats
    assert not [f for f in HELD if not stats[f]], stats
    first, again = random_schedule(1, 3, holds=True), random_schedule(1, 3, holds=True)
    assert first.stats["held bursts"] > 0
    assert (first.trace, first.stats, first.applied) == (again.trace, again.stats, again.applied)

