"""raftlib.progress: a leader's view of each follower (Figure 2's next_index and match_index), one state
transition at a time, and the questions the leader asks of all followers together."""

from __future__ import annotations

import dataclasses

import pytest

from raftlib import Membership, Snapshot
from raftlib.progress import Progress, ProgressState, ProgressTracker, best_successor

VOTERS5 = Membership(voters=("a", "b", "c", "d", "e"), learners=("z",))


def probing(match_index: int = 0, next_index: int = 1) -> Progress:
    return Progress(match_index=match_index, next_index=next_index)


def replicating(match_index: int, next_index: int) -> Progress:
    return Progress(match_index=match_index, next_index=next_index, state=ProgressState.REPLICATE)


def test_a_probe_waits_for_its_answer_and_replication_pipelines():
    """§5.3: while the follower's log may not match, one AppendEntries at a time; once it matches, the next batch
    goes before the last is answered."""
    pr = probing(next_index=5)
    assert not pr.paused
    pr.sent_entries(7)
    assert pr.paused and pr.next_index == 5  # a probe does not move next_index
    pr = replicating(match_index=4, next_index=5)
    pr.sent_entries(7)
    assert not pr.paused and pr.next_index == 8
    pr.sent_entries(4)  # an empty append (a heartbeat) at prev_log_index 4
    assert pr.next_index == 8


def test_a_matching_probe_starts_replication_just_past_the_match():
    pr = probing(match_index=2, next_index=5)
    pr.sent_entries(6)
    assert pr.update_match(6)
    pr.matched()
    assert (pr.state, pr.probe_sent, pr.match_index, pr.next_index) == (ProgressState.REPLICATE, False, 6, 7)


def test_match_index_only_grows():
    """A late or duplicated success for a shorter prefix tells nothing new; match_index never goes back."""
    pr = replicating(match_index=9, next_index=12)
    assert not pr.update_match(5)
    pr.matched()
    assert (pr.match_index, pr.next_index) == (9, 12)


def test_a_success_during_a_snapshot_transfer_keeps_sending_the_snapshot():
    pr = probing()
    pr.become_snapshot(Snapshot(50, 3, Membership(("a",))))
    assert pr.update_match(50)
    pr.matched()
    assert pr.state is ProgressState.SNAPSHOT and pr.snapshot_index == 50 and pr.next_index == 51


@pytest.mark.parametrize(
    "pr, reject_index, stale",
    [
        (replicating(match_index=5, next_index=9), 5, True),  # at or below the match: from before it
        (replicating(match_index=5, next_index=9), 7, False),
        (probing(match_index=0, next_index=4), 3, False),  # answers the probe in flight (prev_log_index 3)
        (probing(match_index=0, next_index=4), 6, True),  # answers a probe since replaced
        (Progress(state=ProgressState.SNAPSHOT, next_index=4), 3, True),  # nothing but the snapshot is in flight
    ],
)
def test_only_a_rejection_of_what_is_in_flight_counts(pr, reject_index, stale):
    assert pr.is_stale_rejection(reject_index) is stale


def test_a_rejection_backs_off_to_the_hint_but_never_to_or_below_the_match():
    """§5.3 with fast backtracking: retry where the follower's hint says, at most the rejected index, and never
    at or below what the follower has already matched."""
    pr = replicating(match_index=5, next_index=20)
    pr.sent_entries(25)
    pr.rejected(reject_index=12, hint=9)
    assert (pr.state, pr.probe_sent, pr.next_index) == (ProgressState.PROBE, False, 9)
    pr = replicating(match_index=5, next_index=20)
    pr.rejected(reject_index=12, hint=2)
    assert pr.next_index == 6
    pr = replicating(match_index=5, next_index=20)
    pr.rejected(reject_index=12, hint=15)
    assert pr.next_index == 12


def test_a_finished_snapshot_probes_from_just_after_it():
    pr = Progress(match_index=3, next_index=4)
    pr.become_snapshot(Snapshot(40, 2, Membership(("a",)), b"x" * 10))
    pr.snapshot_offset = 10
    pr.snapshot_done(40, restoring=True)
    assert (pr.state, pr.match_index, pr.next_index, pr.snapshot, pr.snapshot_offset, pr.restoring) == (
        ProgressState.PROBE, 40, 41, None, 0, True)
    pr.restoring = True  # as an append reply set it; then an install where append replies do not carry it
    pr.become_snapshot(Snapshot(50, 2, Membership(("a",)), b"x"))
    pr.snapshot_done(50, restoring=False)
    assert (pr.match_index, pr.restoring) == (50, False)


def test_the_committed_index_is_what_a_majority_of_the_voters_holds():
    """§5.3, §5.4: an index is on a majority when the quorum-th highest match index reaches it. Learners hold
    entries but do not count."""
    t = ProgressTracker.for_new_leader(VOTERS5.node_ids, next_index=11)
    for node_id, match in {"b": 8, "c": 3, "d": 9, "e": 1, "z": 100}.items():
        t[node_id].match_index = match
    assert t.committed_index(VOTERS5, "a", 10) == 8  # 10, 9, 8 | 3, 1
    assert t.committed_index(VOTERS5, "a", 2) == 3  # 9, 8, 3 | 2, 1: the leader's own unsaved entries do not count
    assert t.committed_index(Membership(("a",)), "a", 4) == 4


def test_check_quorum_counts_the_leader_and_the_voters_heard_from():
    """Thesis §6.2: a leader that did not hear from a majority of voters in an election timeout steps down."""
    t = ProgressTracker.for_new_leader(VOTERS5.node_ids, next_index=1)
    assert t.quorum_active(VOTERS5, "a")  # a new leader counts everyone as active
    t.reset_recent_active("a")
    assert [n for n, pr in t.items() if pr.recent_active] == ["a"]
    t["z"].recent_active = t["b"].recent_active = True
    assert not t.quorum_active(VOTERS5, "a")  # a, b: the learner does not count
    t["e"].recent_active = True
    assert t.quorum_active(VOTERS5, "a")


def test_members_added_and_removed_are_tracked_and_the_leader_stays():
    t = ProgressTracker.for_new_leader(("a", "b", "c"), next_index=6)
    t["b"].match_index = 5
    t.set_members(Membership(voters=("b", "d")), next_index=7, self_id="a")
    assert sorted(t) == ["a", "b", "d"] and t["b"].match_index == 5 and t["d"].next_index == 7


def test_the_most_up_to_date_voter_is_the_one_with_the_highest_match():
    t = ProgressTracker.for_new_leader(("a", "b", "c"), next_index=1)
    t["b"].match_index, t["c"].match_index = 7, 4
    assert best_successor(t, ("b", "c")) == "b"
    t["c"].match_index = 7
    assert best_successor(t, ("b", "c")) == "c"  # a tie: the greater id, as a deterministic choice
    assert best_successor(t, ("x", "c")) == "c"  # not tracked: never picked
    t["c"].restoring = True  # it said it restores a snapshot: it would ignore TimeoutNow
    assert best_successor(t, ("b", "c")) == "b"
    t["b"].restoring = True
    assert best_successor(t, ("b", "c")) is None and t.status("a", 0)["b"].restoring


def test_of_the_most_up_to_date_voters_a_hand_over_prefers_one_heard_from_lately():
    """Review restoreedges L3: the transport holds what it sends a live but slow peer while it waits for that peer's
    late reply (up to ten reply timeouts), TimeoutNow included: a hand-over that picked it by the tie-break (the
    greater id) waited out its bound. Of the voters that tie on the highest match, one heard from within the
    window is preferred; one that is behind is not (it must catch up first); with none heard from, as before."""
    t = ProgressTracker.for_new_leader(("a", "b", "c", "d"), next_index=1)
    for n in "bcd":
        t[n].match_index = 7
    t["b"].heard(tick=100)
    t["c"].heard(tick=95)
    t["d"].heard(tick=40)  # the greatest id, silent for 60 ticks: its sender waits for a late reply
    heard = [n for n, pr in t.items() if pr.heard_within(10, tick=100)]
    assert heard == ["b", "c"]
    assert best_successor(t, ("b", "c", "d"), heard) == "c"  # of those heard from: the greater id
    assert best_successor(t, ("b", "c", "d")) == "d"  # nobody preferred: the greatest id, as before
    assert best_successor(t, ("b", "d"), ["b"]) == "b"
    t["d"].match_index = 8  # ahead of all: a responsive voter that is behind does not pass it
    assert best_successor(t, ("b", "c", "d"), heard) == "d"
    t["c"].restoring = True  # a restoring voter is never picked, heard from or not
    t["d"].match_index = 7
    assert best_successor(t, ("b", "c", "d"), heard) == "b"
    status = t.status("a", 100)  # the copy a stopping server reads (raftlib.server.node.best_successor)
    assert (status["b"].heard_ticks_ago, status["d"].heard_ticks_ago) == (0, 60)
    assert [n for n, pr in status.items() if pr.heard_within(10)] == ["b", "c"]
    assert ProgressTracker.for_new_leader(("a", "b"), next_index=1).status("a", 5)["b"].heard_ticks_ago is None


def test_the_status_is_a_frozen_copy_of_the_followers_only():
    t = ProgressTracker.for_new_leader(("a", "b", "c"), next_index=3)
    t["c"].update_match(2)
    status = t.status("a", 0)
    assert list(status) == ["b", "c"] and status["c"].match_index == 2 and status["c"].next_index == 3
    t["c"].update_match(3)
    assert status["c"].match_index == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        status["c"].match_index = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        status["d"] = status["c"]  # type: ignore[index]


def test_the_window_of_appends_in_flight_fills_by_count_and_by_bytes_and_acknowledgements_free_it():
    """etcd-io/raft's Inflights: each append with entries sent in REPLICATE takes a place (its last index and
    bytes); an empty one (a heartbeat) takes none; an acknowledgement frees every append at or below its match; the
    bytes bound is soft (the append that crosses it goes)."""
    pr = replicating(match_index=4, next_index=5)
    pr.sent_entries(6, 100)
    pr.sent_entries(6, 0)  # a heartbeat at prev_log_index 6: no entries, no place
    pr.sent_entries(9, 300)
    assert pr.inflight == [(6, 100), (9, 300)] and pr.inflight_bytes == 400 and pr.next_index == 10
    assert pr.window_full(max_messages=2, max_bytes=1000)
    assert pr.window_full(max_messages=3, max_bytes=400)
    assert not pr.window_full(max_messages=3, max_bytes=401)
    assert pr.update_match(7)  # the first append whole, the second in part: only the first is acknowledged
    assert pr.inflight == [(9, 300)] and pr.inflight_bytes == 300
    assert not pr.window_full(max_messages=2, max_bytes=1000)
    assert pr.update_match(9)
    assert pr.inflight == [] and pr.inflight_bytes == 0
    assert not pr.window_full(max_messages=1, max_bytes=1)  # an empty window is never full


@pytest.mark.parametrize("how", ["rejected", "snapshot", "snapshot_done", "probe"])
def test_the_window_is_emptied_when_the_follower_leaves_replicate(how):
    """PROBE and SNAPSHOT have nothing in the window: what was in flight is sent again from the new next_index, or
    replaced by the snapshot, and a window kept would hold back the follower's next REPLICATE for nothing."""
    pr = replicating(match_index=4, next_index=5)
    pr.sent_entries(8, 500)
    if how == "rejected":
        pr.rejected(8, 6)
    elif how == "snapshot":
        pr.become_snapshot(Snapshot(50, 3, Membership(("a",))))
    elif how == "snapshot_done":
        pr.become_snapshot(Snapshot(50, 3, Membership(("a",))))
        pr.snapshot_done(50, restoring=False)
    else:
        pr.become_probe()
    assert pr.inflight == [] and pr.inflight_bytes == 0
    assert not pr.window_full(max_messages=1, max_bytes=1)


def test_a_probe_takes_no_place_in_the_window():
    pr = probing(next_index=5)
    pr.sent_entries(9, 400)
    assert pr.paused and pr.inflight == [] and pr.inflight_bytes == 0
