"""The wire codec: every message round-trips; junk raises CodecError and nothing else."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftlib import (
    AppendEntries,
    AppendEntriesReply,
    Entry,
    EntryKind,
    InstallSnapshot,
    InstallSnapshotReply,
    Member,
    Membership,
    ReadIndexReply,
    ReadIndexRequest,
    Removed,
    RequestVote,
    RequestVoteReply,
    TimeoutNow,
)
from raftlib import codec
import wire_637af74

MEMBERSHIP = Membership(("a", "b"), ("c",), (Member("a", "h:1", "h:2"), Member("c", "h:3", "h:4")))
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a CURVE public key in Z85 (RFC 32's example)
KEYED = Membership(("a", "b"), (), (Member("a", "h:1", "h:2", KEY), Member("b", "h:3", "h:4", KEY)))
SAMPLES = [
    RequestVote("a", "b", 3, 10, 2, pre_vote=True, leadership_transfer=False, pre_vote_round=(1 << 32) + 7),
    RequestVoteReply("b", "a", 3, True, True, (1 << 32) + 7),
    RequestVote("a", "b", 3, 10, 2, leadership_transfer=True),
    RequestVoteReply("b", "a", 3, False),
    AppendEntries("a", "b", 4, 9, 3, (Entry(4, 10, EntryKind.COMMAND, b"x" * 50),
                                       Entry(4, 11, EntryKind.MEMBERSHIP, b"", MEMBERSHIP),
                                       Entry(4, 12, EntryKind.NOOP, b"")), 8, 7),
    AppendEntriesReply("b", "a", 4, False, 0, 9, 5, 2, 7),
    AppendEntriesReply("b", "a", 4, True, 9, read_round=7, restoring=True),
    InstallSnapshot("a", "b", 4, 100, 3, MEMBERSHIP, 64, b"chunk", False),
    InstallSnapshot("a", "b", 4, 100, 3, KEYED, 64, b"chunk", False),
    InstallSnapshotReply("b", "a", 4, 100, 69, False),
    TimeoutNow("a", "b", 5),
    ReadIndexRequest("b", "a", 5, (1, 2, 3)),
    ReadIndexReply("a", "b", 5, (1, 2, 3), 42),
    Removed("a", "c", 5, 17, "a"),
    Removed("b", "c", 5, 17, ""),
]


@pytest.mark.parametrize("m", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(m):
    assert codec.decode_batch(codec.encode_batch([m])) == [m]


def test_vote_messages_from_before_pre_vote_rounds_decode_with_round_0():
    """pre_vote_round came after format version 1: frames without it still decode; fewer fields do not."""
    old_request = cbor2.dumps([1, [[1, "a", "b", 3, 10, 2, True, False]]])
    old_reply = cbor2.dumps([1, [[2, "b", "a", 3, True, True]]])
    assert codec.decode_batch(old_request) == [RequestVote("a", "b", 3, 10, 2, True, False, 0)]
    assert codec.decode_batch(old_reply) == [RequestVoteReply("b", "a", 3, True, True, 0)]
    for short in ([1, "a", "b", 3, 10, 2, True], [2, "b", "a", 3, True], [3, "a", "b", 4, 9, 3, [], 8]):
        with pytest.raises(codec.CodecError, match="field count"):
            codec.decode_batch(cbor2.dumps([1, [short]]))


def test_real_votes_go_out_as_version_1_had_them():
    """A rolling upgrade: a node that does not know pre-vote rounds reads a frame only if every message in it has
    the fields it knows. A real vote (round 0) and its reply leave the round off; a pre-vote carries it."""
    frame = codec.encode_batch([RequestVote("a", "b", 3, 10, 2, leadership_transfer=True),
                                RequestVoteReply("b", "a", 3, True)])
    assert cbor2.loads(frame) == [1, [[1, "a", "b", 3, 10, 2, False, True], [2, "b", "a", 3, True, False]]]
    pre_vote = codec.encode_batch([RequestVote("a", "b", 3, 10, 2, pre_vote=True, pre_vote_round=9)])
    assert cbor2.loads(pre_vote) == [1, [[1, "a", "b", 3, 10, 2, True, False, 9]]]


def test_members_without_a_key_are_as_version_1_wrote_them_and_bad_keys_are_refused():
    """A member's public key (a cluster secret) is a fourth field, left off when empty: old data and old nodes'
    frames decode as before, and a configuration without keys goes out as they know it."""
    old = [5, "a", "b", 4, 100, 3, [["a"], [], [["a", "h:1", "h:2"]]], 0, b"", True]  # an InstallSnapshot
    [m] = codec.decode_batch(cbor2.dumps([1, [old]]))
    assert m.membership.members == (Member("a", "h:1", "h:2", ""),)
    assert cbor2.loads(codec.encode_batch([m]))[1][0][6] == [["a"], [], [["a", "h:1", "h:2"]]]
    for bad in ("short", KEY[:-1] + " ", 7):
        frame = [5, "a", "b", 4, 100, 3, [["a"], [], [["a", "h:1", "h:2", bad]]], 0, b"", True]
        with pytest.raises(codec.CodecError, match="public key"):
            codec.decode_batch(cbor2.dumps([1, [frame]]))


def test_unknown_version_and_oversized_frames_are_refused():
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode_batch(cbor2.dumps([99, []]))
    with pytest.raises(codec.CodecError, match="limit"):
        codec.decode_batch(b"\x00" * (codec.MAX_FRAME_BYTES + 1))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_codec_error(data):
    try:
        codec.decode_batch(data)
    except codec.CodecError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_frames_raise_only_codec_error(m, data):
    frame = bytearray(codec.encode_batch([m]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    try:
        out = codec.decode_batch(bytes(frame))
    except codec.CodecError:
        return
    assert all(type(x) in codec._SCHEMAS for x in out)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=5) | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=30,
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(json_like, max_size=8), st.integers(0, 10))
def test_well_formed_cbor_of_the_wrong_shape_raises_only_codec_error(fields, tag):
    for frame in ([1, [[tag] + fields]], [1, fields], fields):
        try:
            codec.decode_batch(cbor2.dumps(frame))
        except codec.CodecError:
            pass


def test_an_append_whose_entries_do_not_start_after_its_prev_log_index_is_refused():
    """A follower takes an append's entries as prev_log_index + 1 onwards (its match index is prev_log_index plus
    their count): entries that start anywhere else are refused as junk is, the frame dropped and logged by the
    transport, and never reach the core (review of cu, Q5)."""
    sample = next(m for m in SAMPLES if isinstance(m, AppendEntries))
    assert codec.decode_batch(codec.encode_batch([sample])) == [sample]
    for shift in (-1, 1, -sample.prev_log_index):
        shifted = dataclasses.replace(sample, prev_log_index=sample.prev_log_index + shift)
        with pytest.raises(codec.CodecError, match="prev_log_index"):
            codec.decode_batch(codec.encode_batch([sample, shifted]))
    empty = dataclasses.replace(sample, prev_log_index=0, entries=())  # a heartbeat: no entries to check
    assert codec.decode_batch(codec.encode_batch([empty])) == [empty]


def test_hmac_signed_frames_of_older_versions_are_refused_with_the_reason():
    """Frames are not signed any more (a secret means CURVE connections: raftlib.transport); a frame as older
    versions signed it is refused, saying so."""
    frame = codec.SIGNED_MAGIC + b"\x00" * 32 + codec.encode_batch(SAMPLES[:3])
    with pytest.raises(codec.CodecError, match="HMAC-signed frame from an older raftdzmq"):
        codec.decode_batch(frame)


def test_an_old_node_decodes_every_message_a_new_node_sends():
    """A rolling upgrade (third review of snapfork, item B): a node of 637af74 (its decoder frozen in
    tests/wire_637af74.py) drops a whole frame it cannot decode, with the heartbeat batched in it. Every message of
    a cluster without a secret (members without keys: 637af74 knew none) must decode there as it was sent, the
    InstallSnapshot chunks included, alone and batched."""
    plain = [m for m in SAMPLES if KEYED not in (getattr(m, "membership", None),)
             and not any(e.membership == KEYED for e in getattr(m, "entries", ()))
             and not getattr(m, "restoring", False)]  # sent only once every member reads it (the next test)
    assert any(isinstance(m, InstallSnapshot) for m in plain)
    for m in plain:
        assert wire_637af74.equivalent(wire_637af74.decode_batch(codec.encode_batch([m])), [m]), m
    assert wire_637af74.equivalent(wire_637af74.decode_batch(codec.encode_batch(plain)), plain)
    # The old decoder builds 637af74's classes (frozen with it), compared field by field: not trivially equal.
    old = wire_637af74.decode_batch(codec.encode_batch(plain))
    assert all(type(o) is not type(m) for o, m in zip(old, plain))
    assert not wire_637af74.equivalent(old, [dataclasses.replace(m, term=m.term + 1) for m in plain])


def test_an_append_reply_says_restoring_only_when_it_restores_and_old_nodes_drop_it():
    """Review of fastrestore2, L1': AppendEntriesReply.restoring came after format version 1. Left off when False
    (every reply but a restoring follower's goes out as version 1 had it); a frame without it decodes as False. An
    old node drops a frame that carries it, which is why a node says it only once the cluster's feature level says
    every member reads it (core.Config.restoring_in_replies, raftlib.server.node)."""
    plain = AppendEntriesReply("b", "a", 4, True, 9, read_round=7)
    assert cbor2.loads(codec.encode_batch([plain])) == [1, [[4, "b", "a", 4, True, 9, 0, 0, 0, 7]]]
    assert codec.decode_batch(cbor2.dumps([1, [[4, "b", "a", 4, True, 9, 0, 0, 0, 7]]])) == [plain]
    restoring = dataclasses.replace(plain, restoring=True)
    assert cbor2.loads(codec.encode_batch([restoring])) == [1, [[4, "b", "a", 4, True, 9, 0, 0, 0, 7, True]]]
    with pytest.raises(Exception):
        wire_637af74.decode_batch(codec.encode_batch([restoring]))
    with pytest.raises(codec.CodecError, match="boolean"):
        codec.decode_batch(cbor2.dumps([1, [[4, "b", "a", 4, True, 9, 0, 0, 0, 7, 1]]]))


@pytest.mark.parametrize("tag", [0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 261, 1004, 55799, 2**32])
def test_every_cbor_tag_in_a_frame_is_refused_before_its_semantic_decoding(tag):
    """Fifth review of snapfork (2): cbor2's decoders of some tags are quadratic (a 150 KB bigfloat: 1.9 s on the
    loop). No frame has a tag: each is refused as such, whatever its number, not decoded and then found odd."""
    frame = b"\x82\x01\x81" + cbor2.dumps(cbor2.CBORTag(tag, [-3, 5]))
    with pytest.raises(codec.CodecError, match="CBOR tag"):
        codec.decode_batch(frame)
    nested = b"\x82\x01\x81\xc5\x82" + cbor2.dumps(-3) + b"\xc2\x5a" + (100_000).to_bytes(4, "big") + b"\xff" * 100_000
    with pytest.raises(codec.CodecError, match="CBOR tag"):
        codec.decode_batch(nested)
