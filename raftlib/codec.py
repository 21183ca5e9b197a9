"""The wire format: Raft messages to bytes and back, with cbor2.

A frame is the CBOR array [FORMAT_VERSION, [message, ...]]; a message is [tag, src, dst, term, fields...] in the
order its dataclass declares them; an entry is [term, index, kind, data, membership or null]. Decoding checks
every field's type and the frame's size: anything that is not a well-formed frame of known messages raises
`CodecError`, and only that (a remote error: the caller logs and drops it).

Fields added to a message after version 1 went out come last, and the decoder takes frames without them (the
dataclass default stands in): new nodes read what old ones send. The encoder leaves such a field off when it
holds its default (0), so a message that does not use it is as old nodes know it: RequestVote and its reply carry
`pre_vote_round` only for pre-votes, and real votes still reach old nodes during a rolling upgrade; an
AppendEntriesReply carries `restoring` only while its follower restores a snapshot, and only once every member
reads it (core.Config.restoring_in_replies). Old nodes
cannot read a message that carries one, nor a message type they do not know, and drop the whole frame.

Frames are not signed here: with a cluster secret the transport's CURVE connections authenticate and encrypt
them (raftlib.transport). A frame that starts as the HMAC-signed frames of earlier versions did is refused with a
reason that says so.
"""

from __future__ import annotations

import dataclasses

import cbor2

from .messages import (
    AppendEntries,
    AppendEntriesReply,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotReply,
    Member,
    Membership,
    Message,
    ReadIndexReply,
    ReadIndexRequest,
    Removed,
    RequestVote,
    RequestVoteReply,
    Snapshot,
    TimeoutNow,
)

FORMAT_VERSION = 1
# zmq's MAXMSGSIZE on the Raft port, so also the most a stranger can make a node hold per connection before the
# handshake ends (libzmq applies it to handshake commands too: review 2 F1, 64 MiB then). Every sender fits its
# frames under it (raftlib.transport: FrameBudget): the core bounds an AppendEntries by max_batch_bytes (256 KiB by
# default, at most 1 MiB: raftdzmq's -max-batch-bytes), never adding an entry past it but for a lone one
# (Log.slice), a snapshot chunk by snapshot_chunk_bytes (1 MiB), and an entry by MAX_ENTRY_BYTES.
MAX_FRAME_BYTES = 4 << 20
MAX_ENTRY_BYTES = 2 << 20  # the largest entry's data: alone in its append, it fits a frame with room to spare


class CodecError(ValueError):
    """Bytes that are not a valid frame of this format. Carries a one-line reason."""


SIGNED_MAGIC = b"RDZMQ-HMAC1"  # how earlier versions began a frame signed with the cluster secret


# Field kinds, checked on decode.
_INT, _BOOL, _BYTES, _STR, _ENTRIES, _MEMBERSHIP, _INTS = range(7)

_SCHEMAS: dict[type, tuple[int, tuple[int, ...]]] = {
    RequestVote: (1, (_INT, _INT, _BOOL, _BOOL, _INT)),
    RequestVoteReply: (2, (_BOOL, _BOOL, _INT)),
    AppendEntries: (3, (_INT, _INT, _ENTRIES, _INT, _INT)),
    AppendEntriesReply: (4, (_BOOL, _INT, _INT, _INT, _INT, _INT, _BOOL)),
    InstallSnapshot: (5, (_INT, _INT, _MEMBERSHIP, _INT, _BYTES, _BOOL)),
    InstallSnapshotReply: (6, (_INT, _INT, _BOOL)),
    TimeoutNow: (7, ()),
    ReadIndexRequest: (8, (_INTS,)),
    ReadIndexReply: (9, (_INTS, _INT)),
    Removed: (10, (_INT, _STR)),
}
# How many of a message's last fields came after version 1 (see the module docstring): a frame may lack them.
# Each is an integer whose default is 0, or a boolean whose default is False.
_ADDED_FIELDS: dict[type, int] = {RequestVote: 1, RequestVoteReply: 1,  # pre_vote_round
                                  AppendEntriesReply: 1}  # restoring
_BY_TAG = {tag: (cls, kinds) for cls, (tag, kinds) in _SCHEMAS.items()}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls))[3:] for cls in _SCHEMAS}


# ---- encoding ---------------------------------------------------------------------------------------


def _member_out(x: Member) -> list:
    # The public key only when there is one: without a cluster secret a member is as version 1 wrote it, on the
    # wire and on disk, and older nodes read it.
    if x.public_key:
        return [x.node_id, x.raft_address, x.http_address, x.public_key]
    return [x.node_id, x.raft_address, x.http_address]


def _membership_out(m: Membership) -> list:
    return [list(m.voters), list(m.learners), [_member_out(x) for x in m.members]]


def entry_to_wire(e: Entry) -> list:
    return [e.term, e.index, int(e.kind), e.data, None if e.membership is None else _membership_out(e.membership)]


def _message_out(m: Message) -> list:
    cls = type(m)
    tag, kinds = _SCHEMAS[cls]
    out = [tag, m.src, m.dst, m.term]
    for name, kind in zip(_FIELDS[cls], kinds):
        v = getattr(m, name)
        if kind == _ENTRIES:
            v = [entry_to_wire(e) for e in v]
        elif kind == _MEMBERSHIP:
            v = _membership_out(v)
        elif kind == _INTS:
            v = list(v)
        out.append(v)
    added = _ADDED_FIELDS.get(cls)
    while added and out[-1] == 0:  # left off at their default: old nodes read the message
        out.pop()
        added -= 1
    return out


def estimated_size(m: Message) -> int:
    """About how many bytes `m` takes in a frame, never much less: for fitting frames under MAX_FRAME_BYTES
    without encoding twice."""
    base = 64 + len(m.src) + len(m.dst)
    if type(m) is AppendEntries:
        return base + sum(len(e.data) + 32 + (0 if e.membership is None else _membership_size(e.membership))
                        for e in m.entries)
    if type(m) is InstallSnapshot:
        return base + len(m.data) + _membership_size(m.membership)
    if type(m) is ReadIndexRequest or type(m) is ReadIndexReply:
        return base + 9 * len(m.request_ids)
    return base + (len(m.leader_id) if type(m) is Removed else 0)


def _membership_size(m: Membership) -> int:
    return 16 + sum(32 + len(x.node_id) * 2 + len(x.raft_address) + len(x.http_address) + len(x.public_key)
                    for x in m.members)


def encode_batch(messages: list[Message]) -> bytes:
    return cbor2.dumps([FORMAT_VERSION, [_message_out(m) for m in messages]])


# ---- decoding ---------------------------------------------------------------------------------------


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise CodecError(what)


def _int(v) -> int:
    _need(type(v) is int and 0 <= v < (1 << 63), "expected a non-negative integer")
    return v


def _str(v) -> str:
    _need(type(v) is str and len(v) <= 4096, "expected a string")
    return v


_Z85_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def _public_key(v) -> str:
    """A CURVE public key as Z85 text: 40 characters of Z85's alphabet (32 bytes)."""
    _need(type(v) is str and len(v) == 40 and set(v) <= _Z85_ALPHABET, "bad public key")
    return v


def _membership_in(v) -> Membership:
    _need(type(v) is list and len(v) == 3, "bad membership")
    voters, learners, members = v
    _need(type(voters) is list and type(learners) is list and type(members) is list, "bad membership")
    out = []
    for m in members:
        _need(type(m) is list and len(m) in (3, 4), "bad member")
        public_key = _public_key(m[3]) if len(m) == 4 else ""
        out.append(Member(_str(m[0]), _str(m[1]), _str(m[2]), public_key))
    vs, ls = tuple(_str(x) for x in voters), tuple(_str(x) for x in learners)
    _need(vs == tuple(sorted(set(vs))) and ls == tuple(sorted(set(ls))), "membership not sorted")
    _need(not set(vs) & set(ls), "a node is both voter and learner")
    return Membership(vs, ls, tuple(out))


_ENTRY_KINDS = tuple(sorted(EntryKind, key=lambda k: k.value))
assert [k.value for k in _ENTRY_KINDS] == list(range(len(_ENTRY_KINDS)))


def entry_from_wire(v) -> Entry:
    _need(type(v) is list and len(v) == 5, "bad entry")
    term, index, kind, data, membership = v
    _need(type(data) is bytes, "entry data must be bytes")
    _need(type(kind) is int and 0 <= kind < len(_ENTRY_KINDS), "unknown entry kind")
    kind = _ENTRY_KINDS[kind]  # by position: EntryKind(kind) runs the enum's lookup machinery for every entry
    _need((membership is not None) == (kind is EntryKind.MEMBERSHIP), "membership entry mismatch")
    return Entry(_int(term), _int(index), kind, data, None if membership is None else _membership_in(membership))


def _field(kind: int, v):
    if kind == _INT:
        return _int(v)
    if kind == _BOOL:
        _need(type(v) is bool, "expected a boolean")
        return v
    if kind == _BYTES:
        _need(type(v) is bytes, "expected bytes")
        return v
    if kind == _STR:
        return _str(v)
    if kind == _ENTRIES:
        _need(type(v) is list, "expected a list of entries")
        entries = tuple(entry_from_wire(e) for e in v)
        for a, b in zip(entries, entries[1:]):
            _need(b.index == a.index + 1, "entries not contiguous")
        return entries
    if kind == _MEMBERSHIP:
        return _membership_in(v)
    if kind == _INTS:
        _need(type(v) is list, "expected a list of integers")
        return tuple(_int(x) for x in v)
    raise AssertionError(kind)


def _message_in(v) -> Message:
    _need(type(v) is list and len(v) >= 4, "a message is a list")
    tag = v[0]
    _need(type(tag) is int and tag in _BY_TAG, f"unknown message tag {tag!r}"[:80])
    cls, kinds = _BY_TAG[tag]
    _need(len(kinds) - _ADDED_FIELDS.get(cls, 0) <= len(v) - 4 <= len(kinds), f"wrong field count for {cls.__name__}")
    args = [_str(v[1]), _str(v[2]), _int(v[3])]
    args.extend(_field(k, x) for k, x in zip(kinds, v[4:]))
    m = cls(*args)
    if cls is AppendEntries and m.entries:
        # The follower takes the entries as prev_log_index + 1 onwards (its match index, its commit, §5.3): ones that
        # start anywhere else would move those past its log.
        _need(m.entries[0].index == m.prev_log_index + 1, "entries not from prev_log_index + 1")
    return m


class _EveryTagRefused(dict):
    """cbor2's semantic_decoders for every tag number, each refusing its tag: no frame of ours has one (nor had one
    in any release), and cbor2's decoders of some are quadratic in the input's size (a 150 KB frame with a
    bigfloat held the loop 1.9 s, fifth review of snapfork). Its decoders get the tag's content already decoded
    (cbor2 6.3), so the innermost tag of a nest is refused before any semantic work. The store's snapshot
    decoders (raftlib.server.store, which imports nothing of raftlib) refuse tags alike."""

    def __contains__(self, tag: object) -> bool:
        return True

    def __getitem__(self, tag: object):
        return _refuse_tag

    def get(self, tag: object, default: object = None):
        return _refuse_tag


def _refuse_tag(*_: object) -> object:
    raise cbor2.CBORDecodeError("a CBOR tag (no frame has one)")


def _refuse_unknown_tag(tag: cbor2.CBORTag, immutable: bool) -> object:  # cbor2 6's tag_hook
    raise cbor2.CBORDecodeError(f"a CBOR tag {tag.tag} (no frame has one)")


_NO_TAGS = _EveryTagRefused()


def decode_batch(data: bytes) -> list[Message]:
    """Decode one frame. Raises CodecError, and nothing else, for anything but a valid frame."""
    _need(isinstance(data, (bytes, bytearray, memoryview)), "frame must be bytes")
    _need(not bytes(data[:len(SIGNED_MAGIC)]) == SIGNED_MAGIC,
          "an HMAC-signed frame from an older raftdzmq (a cluster secret now means CURVE connections)")
    _need(len(data) <= MAX_FRAME_BYTES, f"frame of {len(data)} bytes is over the {MAX_FRAME_BYTES} limit")
    try:
        v = cbor2.loads(bytes(data), semantic_decoders=_NO_TAGS, tag_hook=_refuse_unknown_tag)
    except CodecError:
        raise
    except Exception as e:  # cbor2 raises many types on junk; all mean the same to us
        raise CodecError(f"not CBOR: {type(e).__name__}: {e}"[:160]) from None
    _need(type(v) is list and len(v) == 2, "a frame is [version, messages]")
    _need(v[0] == FORMAT_VERSION and type(v[0]) is int, f"unknown format version {v[0]!r}"[:80])
    _need(type(v[1]) is list, "messages must be a list")
    try:
        return [_message_in(m) for m in v[1]]
    except CodecError:
        raise
    except Exception as e:  # e.g. a dataclass assertion on odd values
        raise CodecError(f"bad message: {type(e).__name__}") from None


# ---- records for the storage ----------------------------------------------------------------------


def decode_hard_state(data: bytes) -> HardState:
    v = cbor2.loads(data)
    _need(type(v) is list and len(v) == 3, "bad hard state")
    _need(v[1] is None or type(v[1]) is str, "bad vote")
    return HardState(_int(v[0]), v[1], _int(v[2]))


def encode_snapshot_meta(s: Snapshot) -> list:
    return [s.last_included_index, s.last_included_term, _membership_out(s.membership)]


def decode_snapshot_meta(v, data: bytes) -> Snapshot:
    _need(type(v) is list and len(v) == 3, "bad snapshot metadata")
    return Snapshot(_int(v[0]), _int(v[1]), _membership_in(v[2]), data)
