"""raftlib.readonly: ReadIndex rounds (thesis §6.4), leader leases (§6.4.1) and the bounds on every read, without
a node around them."""

from __future__ import annotations

from raftlib import Membership
from raftlib.readonly import ReadOnly

THREE = Membership(voters=("a", "b", "c"), learners=("z",))


def leader(read_timeout_ticks: int = 20) -> ReadOnly:
    return ReadOnly("a", read_timeout_ticks)


def test_a_round_is_released_by_a_majority_of_the_voters():
    """§6.4 step 2: the reads of a round may be served once a majority confirmed leadership after it began."""
    r = leader()
    r.queue(1, "a", tick=0, committed_in_term=True)
    rnd = r.start_round(read_index=7, tick=0)
    assert rnd is not None and not r.confirmed(rnd, THREE)  # the leader's own acknowledgement is one of three
    assert r.acknowledged("z", rnd.round_id, THREE) == [] and r.read_states == []  # a learner does not count
    assert r.acknowledged("b", rnd.round_id, THREE) == []
    assert r.read_states == [(1, 7)] and r.pending == 0


def test_one_acknowledgement_confirms_every_earlier_round_too():
    r = leader()
    rounds = []
    for request_id in (1, 2, 3):
        r.queue(request_id, "a", tick=0, committed_in_term=True)
        rounds.append(r.start_round(read_index=10 + request_id, tick=0))
    assert [x.round_id for x in rounds] == sorted({x.round_id for x in rounds})  # numbered in order
    r.acknowledged("c", rounds[1].round_id, THREE)
    assert r.read_states == [(1, 11), (2, 12)] and r.pending == 1


def test_a_voter_removed_since_it_acknowledged_no_longer_counts():
    r = leader()
    r.queue(1, "a", tick=0, committed_in_term=True)
    rnd = r.start_round(read_index=3, tick=0)
    r.acknowledged("b", rnd.round_id, Membership(voters=("a", "b", "c", "d", "e")))  # 2 of 5: not yet
    assert r.read_states == []
    r.acknowledged("c", rnd.round_id, Membership(voters=("a", "c", "d", "e")))  # a, c of 4, b gone
    assert r.read_states == []
    r.acknowledged("d", rnd.round_id, Membership(voters=("a", "c", "d", "e")))
    assert r.read_states == [(1, 3)]


def test_other_nodes_reads_are_answered_grouped_by_origin():
    r = leader()
    for request_id, origin in [(1, "b"), (2, "a"), (3, "c"), (4, "b")]:
        r.queue(request_id, origin, tick=0, committed_in_term=True)
    rnd = r.start_round(read_index=9, tick=0)
    assert r.acknowledged("b", rnd.round_id, THREE) == [("b", (1, 4), 9), ("c", (3,), 9)]
    assert r.read_states == [(2, 9)]


def test_a_new_leader_starts_no_round_before_its_first_commit():
    """§6.4 step 1: until an entry of its term is committed, a new leader does not know the commit index."""
    r = leader()
    r.queue(1, "a", tick=0, committed_in_term=False)
    assert r.before_commit and r.start_round(read_index=5, tick=0) is None and not r.unstarted
    r.committed_in_term()
    assert not r.before_commit and r.unstarted
    assert r.start_round(read_index=6, tick=1) is not None


def test_reads_fail_after_the_read_timeout_and_only_this_nodes():
    """Every read is bounded: at read_timeout_ticks this node's own fail (the caller may retry); a follower's are
    dropped, since the follower fails them itself in the same time."""
    r = leader(read_timeout_ticks=20)
    r.queue(1, "a", tick=0, committed_in_term=True)
    r.queue(2, "b", tick=0, committed_in_term=True)
    r.start_round(read_index=5, tick=0)
    r.queue(3, "a", tick=5, committed_in_term=False)
    r.expire(19)
    assert r.failed_reads == [] and r.pending == 3
    r.expire(20)
    assert r.failed_reads == [1] and r.pending == 1
    r.expire(25)
    assert r.failed_reads == [1, 3] and r.pending == 0


def test_a_followers_forwarded_reads_are_answered_or_time_out():
    r = ReadOnly("b", read_timeout_ticks=10)
    r.forward(1)
    r.forward(2)
    assert r.to_forward and r.take_to_forward(tick=3) == (1, 2) and r.take_to_forward(tick=3) == ()
    r.forward(3)
    r.take_to_forward(tick=8)
    r.forwarded_answer((2, 99), read_index=12)  # 99: never asked (or failed already): ignored
    assert r.read_states == [(2, 12)]
    r.expire(13)
    assert r.failed_reads == [1] and r.pending == 1
    r.forwarded_answer((1,), read_index=12)  # too late: it failed
    assert r.take_results() == ([(2, 12)], [1]) and r.take_results() == ([], [])
    r.expire(18)
    assert r.failed_reads == [3] and r.pending == 0


def test_a_change_of_leader_fails_every_read_and_forgets_the_leases():
    r = leader()
    heartbeat = r.new_round_id()
    r.sent_round(heartbeat, tick=0)
    r.acknowledged("b", heartbeat, THREE)
    assert r.lease_holds(1, THREE, lease_ticks=8)
    r.queue(1, "a", tick=0, committed_in_term=True)
    r.queue(2, "c", tick=0, committed_in_term=True)
    r.start_round(read_index=1, tick=0)
    r.queue(3, "a", tick=0, committed_in_term=True)
    r.queue(4, "a", tick=0, committed_in_term=False)
    r.forward(5)
    r.forward(6)
    r.take_to_forward(tick=0)
    r.answer(7, read_index=1)  # answered, not yet taken: confirmed in the term (or role) this reset ends
    assert r.pending == 6 and r.read_states == [(7, 1)]
    r.reset()
    # 2 is c's: c fails it itself. 7 fails too (re-review of lease, finding 3): a read taken after the reset would
    # be handed back with the new term, which its round did not confirm.
    assert sorted(r.failed_reads) == [1, 3, 4, 5, 6, 7] and r.pending == 0 and r.read_states == []
    assert not r.lease_holds(1, THREE, lease_ticks=8)


def test_a_lease_lasts_lease_ticks_from_the_heartbeat_a_majority_answered():
    """Thesis §6.4.1: a voter that answered a heartbeat sent at tick T heard from the leader at or after T, so
    a majority that did lets the leader answer reads alone until T + lease_ticks (not from when they answered)."""
    r = leader()
    assert not r.lease_holds(0, THREE, lease_ticks=8)  # nobody heard from us yet
    assert r.lease_holds(0, Membership(voters=("a",)), lease_ticks=8)  # alone, we are the majority
    first, second = r.new_round_id(), r.new_round_id()
    r.sent_round(first, tick=10)
    r.sent_round(second, tick=14)
    r.acknowledged("z", second, THREE)  # a learner's answer renews nothing that counts
    assert not r.lease_holds(15, THREE, lease_ticks=8)
    r.acknowledged("b", first, THREE)
    assert r.lease_holds(17, THREE, lease_ticks=8) and not r.lease_holds(18, THREE, lease_ticks=8)
    r.acknowledged("c", second, THREE)
    assert r.lease_holds(21, THREE, lease_ticks=8) and not r.lease_holds(22, THREE, lease_ticks=8)
    r.acknowledged("c", first, THREE)  # a late answer to an older round moves nothing back
    assert r.lease_holds(21, THREE, lease_ticks=8)


def test_the_send_times_of_old_heartbeats_are_forgotten():
    r = leader()
    for tick in range(100):
        r.sent_round(r.new_round_id(), tick)
        r.forget_old_rounds(tick - 10)
    assert len(r._round_sent_tick) <= 65
    r.acknowledged("b", 1, THREE)  # forgotten: too old to say anything
    assert not r.lease_holds(99, THREE, lease_ticks=1000)
