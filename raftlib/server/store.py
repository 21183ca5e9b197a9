"""The key/value state machine every node applies the committed log to: keys (str) to records (value bytes, create
index, modify index), the replicated memory of signed admin requests (AdminClaims), and the cluster's feature level.

Rules:
- Pure and deterministic: no gevent, Bottle, zmq, socket, clock or randomness. The same commands in the same order
  give the same state, the same results and the same events on every node (raftlib.interfaces.StateMachine), and
  a snapshot restored gives back the state it was taken of (as far as it is exposed: see "Indices").
- A command is a CBOR array `[op, key, value, expected]` (`command` builds one). Results: "ok"; "missing" (a DELETE
  of a key that is not there); "failed" (a COMPARE_AND_SET whose expected value differs, a CREATE of a key that
  exists, a SET_IF_INDEX or DELETE_IF_INDEX whose index differs); "used" (an ADMIN_CLAIM of a signature claimed
  before); "expired" (an ADMIN_CLAIM older than the claims' horizon); "unchanged" (a SET_FEATURE_LEVEL not above
  the state's); an int (the keys a DELETE_PREFIX deleted: at most MAX_DELETE_KEYS_PER_ENTRY, the first in key
  order; the caller proposes it again while it deleted that many); a TxnResult (a TXN); "error" (a command that
  does not decode or is malformed, or an op of the feature level 2 on a state below it: applied as nothing); "full"
  (a grant beyond MAX_LEASES); "lease full" (a put onto a lease of MAX_KEYS_PER_LEASE keys); NoLease (a put naming
  a lease that is not there, alone or in a txn: nothing applied); for LEASE_REVOKE the keys it deleted or
  "missing", for LEASE_EXPIRE the number of leases that expired. An
  unknown op (a newer version's command) applies as nothing and gives "ok".
- Bounded work per entry (every node applies it on its event loop, and again on a replay): a DELETE_PREFIX, and
  a TXN's prefix deletes together, delete at most MAX_DELETE_KEYS_PER_ENTRY keys, and so do a LEASE_REVOKE (a
  lease holds at most MAX_KEYS_PER_LEASE keys: a put onto a full lease is "lease full") and a LEASE_EXPIRE (it
  expires the leases it names in order while their keys fit in the bound, the first one always, and leaves the
  rest, which the leader proposes again); a TXN's gets together return
  at most MAX_TXN_GET_KEYS keys and MAX_TXN_GET_BYTES of keys and values. Past a bound a result says "more"
  (TxnResult): the same on every node, since the bound is counted in the entry's own order.
- The feature level (rolling upgrades): an older release applies the ops from SET_IF_INDEX on as nothing, so a
  cluster that mixed releases would diverge if they changed anything. The state's `feature_level` starts at 1
  and only SET_FEATURE_LEVEL raises it (never lowers it), at `level_index`; the leader proposes it once every
  member runs a release of FEATURE_LEVEL (raftlib.server.node). Until then those ops apply as nothing ("error")
  here too: the level is in the log, so every node decides alike. `level_index` is set once, when the level
  crosses from below 2 to 2 or more (a later raise keeps it: the exposed indices of older keys never change).
  A SET_FEATURE_LEVEL above this release's FEATURE_LEVEL raises FeatureLevelTooHigh (nothing changed): this node
  cannot apply what follows as the others do, so the runtime stops it (a new binary must take over its data dir).
- Downgrades: once the level is 2 the log holds ops an older release applies as nothing. `on_level_raised` is
  called at every raise (to 2, and from 2 to 3) so that the node takes a snapshot at once (raftlib.runtime's
  request_snapshot): an older binary started on the data dir then stops at start on the V3 (V4) snapshot
  ("unknown format") rather than replay the new ops as nothing, and a restart restores a snapshot of the raised
  level, which says it (a V4's level: raftlib.server.node's _members_read_restoring; review of health, Q1). A downgrade below the cluster's level is not supported.
  Since a node restores its own snapshot by steps while it runs (raftlib.runtime's restore_at_start), it checks
  the snapshot's format name and V4's level first (`check_snapshot`), so that such a binary still stops at start.
- Indices: a key's create index is the index of the entry that created it (after a delete, the next put creates
  it again), its modify index that of the entry that last wrote it. A node that restored a snapshot of the old
  format (level 1, written without indices) knows them as 0, so the indices exposed (`record`, events, compares,
  the V3 snapshot) are max(index, level_index) (`exposed`), and 0 below level 2: the same on every node. Records
  are stored as applied, never rewritten at the raise (an O(keys) pass in one apply: ~1.5 s at 1M keys, a leader
  change); the V3 snapshot writes them as exposed, so its bytes are the same on every node. A txn's compares see
  the state before the txn; its ops apply in order, each seeing the ones before it (as etcd's).
- Events (`on_event`, for watches): one Event per key changed, in a fixed order: a prefix delete's in key
  order, a txn's in op order (a prefix delete inside it in key order), a revoked lease's keys ("delete") and an
  expired lease's ("expire") in key order, lease after lease in the order the entry names them, all with the
  entry's index. None for a delete of a missing key, a failed condition, a restore. They are handed over once the whole command applied,
  and an on_event that raises is logged and does not stop the others: the replicated state never depends on a
  watcher (a txn is never left half applied). A subclass may hand an entry's events over in one call
  (`_hand_over`: node.WatchedStore gives them to the watch history at once; a failure there is logged too, and
  the history then restarts after the entry, so its watchers get 410 rather than skip the entry's events).
- Leases (etcd v3's model): `leases` maps a lease id (the index of the entry that granted it: unique for the
  cluster's life, the same on every node) to its Lease (TTL in whole seconds and its keys); `lease_of` maps a
  key to its lease. A put with a lease attaches the key (a missing lease: NoLease, nothing applied); a put
  without one detaches it; a deleted key leaves its lease. A revoked or expired lease deletes its keys. The state
  machine never reads a clock: when a lease expires is the leader's decision (raftlib.server.leases), which
  reaches every node as a LEASE_EXPIRE entry; an id already gone is skipped. `on_lease(lease_id, ttl_seconds)`
  is called as a grant applies, `on_lease(lease_id, None)` as a lease goes (for the leader's LeaseKeeper).
- The formats are part of the data dir (docs/DATA-DIR.md). Below level 2 a snapshot is
  `[SNAPSHOT_WITH_CLAIMS_V2, map key -> value, claims, horizon]`, the format the previous release reads (a rolling
  upgrade sends a new leader's snapshot to old followers); indices are dropped and restore as 0. From level 2:
  `[SNAPSHOT_V3, map key -> [value, create_index, modify_index], claims, horizon, feature_level, level_index,
  leases]`, the indices as exposed (create <= modify), `leases` a map lease id -> [ttl_seconds, [its keys in
  order]] (ids in order). From level 3 (issue 13): `[SNAPSHOT_V4, records, ...V3's five elements after its map]`,
  `records` an array of indefinite length of byte strings, each the CBOR of a flat array [key, value,
  create_index, modify_index, ...] of at most RESTORE_BATCH_KEYS records or about RESTORE_BATCH_BYTES of values
  (`_write_chunks`): a restore step decodes one with one cbor2 call and checks it by C-level passes over its
  columns (`_chunk_records`), ~3x cheaper than V3's pair-by-pair decode. A level-2 release refuses its name. Both are written by `encode_state` (a forked child runs it,
  raftlib.runtime) with the map of definite length and its keys in increasing order, a batch of keys per cbor2
  call (no second copy of the state). A later level appends elements after the map under an array length that
  this release refuses (ValueError) rather than drop what it does not know; the elements after the map but V3's
  leases (claims, horizon, level, level index: bounded) are decoded in one step (`_tail_state`, the one place
  that knows them), the leases (at most MAX_LEASES, their keys at most the map's) a batch per step
  (`_LeaseTable`).
- A node restores V2 and V3 a batch per turn of its event loop (`restoring`), not in one step that holds the loop
  for as long as the whole state takes to decode (~1 s at 1M keys; V3's lease table ~0.6 s at 100,000 leases):
  it parses the array's and the map's heads itself, then decodes key/value pairs until RESTORE_BATCH_KEYS of
  them or RESTORE_BATCH_BYTES of values, then fills the key table's shards from the pairs decoded, one shard after
  another (`_KeyTableBuild`: no step grows more than one), then the elements after the map, and V3's lease table
  (its map's head parsed here too) until RESTORE_BATCH_LEASES leases or as many of their keys a step, building `leases`,
  `lease_of` and the ordered ids as they come, all checked before anything is replaced. Keys or lease ids out of
  order (older writers wrote the map in insertion order) are not damage: they go into their index one by one
  (O(log n) each, half a batch per step); a key twice, a count that differs from the pairs present, bytes after
  the end, a key not text, a value not bytes, a V3 record not [bytes, int, int] with create <= modify, a lease
  not [ttl, [keys]] with a valid TTL and at most MAX_KEYS_PER_LEASE keys, more than MAX_LEASES leases, an id < 1
  or twice, a key not in the map or on two leases are (ValueError). A plain map (the oldest format) of definite
  length is taken by the same steps; older formats still restore in one step: `[SNAPSHOT_WITH_CLAIMS, map,
  claims]` (a horizon of 0), and maps of indefinite length;
  a lease map of indefinite length (none of ours writes one) is taken a batch per step like the others, and a V3
  whose key map is of indefinite length has its lease table taken by the same code in its one step
  (`_restore_whole_v3`): an id twice is refused however the maps are encoded (cbor2, decoding a map whole, keeps
  the last).
- Every decoder of snapshot bytes refuses CBOR tags (no format of ours has one; cbor2's semantic decoders of some,
  a bigfloat's, are quadratic in the input's size). An error of the snapshot's source (an I/O error,
  raftlib.messages.SnapshotUnreadable) goes up as it is; only damage is a ValueError.
- A restore builds the new state aside and replaces the old one in one assignment at its end (`_replace`): a
  snapshot found bad part way changes nothing, and readers see the old state or the new, never a mix. The old
  state is then freed a bounded batch (keys and bytes) per step. A restore dropped before its end (a newer
  snapshot's replaced it, its node stopped) leaves what it built, or the old state it was freeing, to the next
  restore, whose first steps free it the same way (`_garbage`, `_freeing`).
- A V4 snapshot may also be written a piece at a time while commands apply (`begin_stepped_snapshot`,
  SteppedSnapshotWriter: the runtime's stepped mode, issue 13): the same bytes as `encode_state` at its begin, from
  a copy-on-write view kept by hooks in the one place each kind of change is made (`_puts`, `_delete`, `_grant`,
  `_drop_lease`, an ADMIN_CLAIM); a restore that replaces the state closes it.
- `keys` holds the keys of `data` in order, kept in step by `apply` and `restore` only: a page of keys costs
  O(log n + page), never a sort of the whole key set (which holds the event loop for as long as it takes). A
  restore builds it from keys that come in increasing order without sorting, checking the order.
"""

from __future__ import annotations

import io
import logging
import operator
from itertools import islice
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple, NoReturn, TypeGuard

import cbor2
from sortedcontainers import SortedList

log = logging.getLogger("raftdzmq.store")

# The ops of a command. ADMIN_CLAIM is [ADMIN_CLAIM, signature, b"", [timestamp, now]]: a signed admin request about
# to take effect (AdminClaims).
SET, DELETE, COMPARE_AND_SET, CREATE, ADMIN_CLAIM = 0, 1, 2, 3, 4
# The ops of feature level 2 (new numbers: an op number is never reused). SET_IF_INDEX is [op, key, value,
# prev_index] and DELETE_IF_INDEX [op, key, b"", prev_index]: on the modify index, 0 for a missing key (issue 14's
# ?prev_index=N; a DELETE_IF_INDEX of a missing key is "failed" unless N is 0, then "missing"). DELETE_PREFIX is [op, prefix, b"", None]. TXN is [op, "", b"", [compares, success, failure]]
# (txn_problem gives the shape). SET_FEATURE_LEVEL is [op, "", b"", level].
SET_IF_INDEX, DELETE_IF_INDEX, DELETE_PREFIX, TXN, SET_FEATURE_LEVEL = 5, 6, 7, 8, 9
# Leases (issue 14 part 2), of level 2 too: part 1 was never released alone, so no node applies ops 5-9 and not
# these. LEASE_GRANT is [op, "", b"", ttl_seconds]: the lease's id is the entry's index. LEASE_REVOKE is
# [op, "", b"", lease_id] and LEASE_EXPIRE [op, "", b"", [lease_id, ...]] (the leader's, at most MAX_EXPIRE_BATCH
# ids). PUT_WITH_TTL is [op, key, value, ttl_seconds]: a lease of its own (id: the entry's index) and the key on
# it. SET_WITH_LEASE is [op, key, value, lease_id].
LEASE_GRANT, LEASE_REVOKE, LEASE_EXPIRE, PUT_WITH_TTL, SET_WITH_LEASE = 10, 11, 12, 13, 14
LEVEL_2_OPS = frozenset((SET_IF_INDEX, DELETE_IF_INDEX, DELETE_PREFIX, TXN, LEASE_GRANT, LEASE_REVOKE, LEASE_EXPIRE,
                         PUT_WITH_TTL, SET_WITH_LEASE))
# The feature level of this release: 1 is every release before issue 14; 3 adds no op, only the snapshot format
# V4 (issue 13: its records in chunks, each decoded by one cbor2 call), which a node of level 2 cannot read.
FEATURE_LEVEL = 3
SNAPSHOT_V3 = "raftdzmq-kv-v3"
SNAPSHOT_V4 = "raftdzmq-kv-v4"
# A restore step decodes at most this many key/value pairs, and ends once the values decoded pass this many bytes:
# ~1 us a pair of 100 bytes (cbor2 6.3 from a buffered reader, the order checked, the pair put aside for its
# shard: `_KeyTableBuild`), so ~2 ms a step at 1M keys on this machine's cores (STACK-NOTES: a loop step should
# stay well under 10 ms); with 256 KiB
# values a count bound alone let one step copy 512 MiB (206 ms, the fifth review).
RESTORE_BATCH_KEYS = 2048
RESTORE_BATCH_BYTES = 128 << 10
# A stepped snapshot's step (SteppedSnapshotWriter.step) ends once the values it wrote pass this many bytes, whatever
# its count of keys: 256 keys of 1 MiB would copy 256 MiB in one step.
SNAPSHOT_STEP_BYTES = 128 << 10
# A restore step of V3's lease table decodes at most this many leases, and ends once their keys pass this many: ~2.3 us
# a lease of one key (two items decoded, a set, a Lease, the checks, lease_of), so ~2.5 ms a step; at 2,048 a step
# took 4-5 ms here, 10 ms when a dict grew (bench/restore_steps.py). One lease has at most MAX_KEYS_PER_LEASE keys.
RESTORE_BATCH_LEASES = 1024
MAX_LEASES = 100_000  # a grant beyond this many leases applies as "full" (409 at the edge)
MAX_TTL_SECONDS = 365 * 24 * 3600  # a lease's TTL: 1 to this many whole seconds (the edge raises the minimum)
MAX_EXPIRE_BATCH = 128  # at most this many leases expire in one LEASE_EXPIRE entry
MAX_TXN_OPS = 128  # at most this many compares, and this many ops in each branch, in one transaction (etcd's)
# Bounds on one entry's work (the module's rules). Part of the replicated state's rules: every node must count
# alike, so changing them is a change of feature level. 2,000 keys of a prefix delete took 7 to 15 ms to apply at
# 100-byte values on the shared 2-core test machine (bench/store_apply.py), under the 300 ms election timeout.
MAX_DELETE_KEYS_PER_ENTRY = 2000
MAX_TXN_GET_KEYS = 1000
MAX_TXN_GET_BYTES = 4 << 20
# A lease holds at most this many keys, so that its revoke or expiry deletes at most MAX_DELETE_KEYS_PER_ENTRY.
MAX_KEYS_PER_LEASE = MAX_DELETE_KEYS_PER_ENTRY
COMPARE_TARGETS = ("value", "modify_index", "create_index", "exists", "lease")
COMPARE_OPS = ("==", "!=", "<", ">")
SNAPSHOT_WITH_CLAIMS = "raftdzmq-kv-claims-v1"
SNAPSHOT_WITH_CLAIMS_V2 = "raftdzmq-kv-claims-v2"
# The clock skew allowed between the signer of an admin request and the leader that checks it (admin.AdminGuard).
ADMIN_CLOCK_SKEW_SECONDS = 300.0
# Part of the replicated state's rules: how far behind the newest leader clock a claim is kept (AdminClaims).
CLAIM_RETENTION_SECONDS = 3 * ADMIN_CLOCK_SKEW_SECONDS


def command(op: int, key: str, value: bytes = b"", expected: object = None) -> bytes:
    """The command that `KeyValueStore.apply` carries out (see the module's rules)."""
    return cbor2.dumps([op, key, value, expected])


class AdminClaims:
    """The replicated memory of signed admin requests that took effect, so that each takes effect at most once in
    the whole cluster: a leader proposes an ADMIN_CLAIM (the signature, its timestamp and the leader's clock) before
    acting, and acts only if the claim applied as "ok"; a claim of a signature already in the log applies as
    "used". Every node applies the same claims in log order, so a leader elected later (or after a restart, or a
    snapshot) refuses what an earlier one took.

    Rules: deterministic (no clock of its own: `now` comes in the command), and the whole state is `claims` and
    `horizon`, both in the snapshot, so a node that restored a snapshot and one that applied the log agree on every
    later result. The horizon is the newest `now` seen minus CLAIM_RETENTION_SECONDS; claims with a timestamp before
    it are forgotten, and a claim with a timestamp before it applies as "expired" (refused), so a forgotten request
    can never take effect again, whatever the leaders' clocks: safety does not rest on the clocks agreeing. The
    clocks matter for availability only: a leader whose clock is more than CLAIM_RETENTION_SECONDS -
    ADMIN_CLOCK_SKEW_SECONDS behind the newest `now` sees its fresh requests refused until it catches up. Memory: one
    entry per admin request of the last CLAIM_RETENTION_SECONDS."""

    __slots__ = ("claims", "horizon")

    def __init__(self, claims: dict[str, float] | None = None, horizon: float = 0.0) -> None:
        self.claims: dict[str, float] = dict(claims or {})  # signature -> its timestamp
        self.horizon = horizon

    def apply(self, signature: object, when: object) -> str:
        """`when`: [the request's timestamp, the proposing leader's clock], Unix seconds."""
        if type(signature) is not str or type(when) is not list or len(when) != 2 or not all(
                type(t) in (int, float) for t in when):
            return "error"  # not written by this version: nothing to claim
        timestamp, now = when
        if now - CLAIM_RETENTION_SECONDS > self.horizon:
            self.horizon = now - CLAIM_RETENTION_SECONDS
            self.claims = {s: t for s, t in self.claims.items() if t >= self.horizon}
        if timestamp < self.horizon:
            return "expired"  # it may have been claimed and forgotten: refuse it
        if signature in self.claims:
            return "used"
        self.claims[signature] = timestamp
        return "ok"


class FeatureLevelTooHigh(Exception):
    """A SET_FEATURE_LEVEL above this release's FEATURE_LEVEL: this node cannot apply what follows correctly."""


class Lease:
    """One lease of the replicated state: its TTL (whole seconds) and its keys."""

    __slots__ = ("ttl_seconds", "keys")

    def __init__(self, ttl_seconds: int, keys: set[str] | None = None) -> None:
        self.ttl_seconds = ttl_seconds
        self.keys: set[str] = keys if keys is not None else set()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lease) and (self.ttl_seconds, self.keys) == (other.ttl_seconds, other.keys)

    def __repr__(self) -> str:
        return f"Lease({self.ttl_seconds}, {sorted(self.keys)!r})"


class NoLease(NamedTuple):
    """The result of a put (alone or in a txn) naming a lease that is not there: nothing was applied."""

    lease_id: int


def valid_ttl(ttl_seconds: object) -> TypeGuard[int]:
    return type(ttl_seconds) is int and 1 <= ttl_seconds <= MAX_TTL_SECONDS


class Event(NamedTuple):
    """One change of one key, for watches (the module's rules, "Events"). `value` is None for a delete;
    `create_index` is the key's (exposed) create index, the deleted record's for a delete."""

    type: str  # "put", "delete" or "expire"
    key: str
    value: bytes | None
    index: int  # type: ignore[assignment]  # the brief's name; it hides tuple.index, which nothing here calls
    create_index: int


# Event(...) without the Python frame of a NamedTuple's __new__ (half the cost: one Event per key a txn writes). It
# skips what that __new__ does besides: no defaults are filled in and the count is not checked, so every field
# must be given, in order (a short tuple would make an Event without its last fields). Event has no defaults.
_new_event: Callable[[type[Event], tuple], Event] = tuple.__new__


class TxnResult(NamedTuple):
    """A TXN's result: whether its compares all held, and one result per op of the branch it ran, in order:
    ("put", key), ("delete", number of keys deleted, more), ("get", [(key, value, create_index, modify_index),
    ...], more); `more`: a bound of the module's rules stopped it before the end of its prefix."""

    succeeded: bool
    results: list[tuple]


def _compare_problem(c: object) -> str | None:
    if type(c) is not list or len(c) != 4:
        return "a compare is [key, target, op, operand]"
    key, target, op, operand = c
    if type(key) is not str or not key:
        return "a compare needs a key"
    if target not in COMPARE_TARGETS:
        return f"unknown target {target!r} (want one of {', '.join(COMPARE_TARGETS)})"
    if op not in COMPARE_OPS:
        return f"unknown compare op {op!r} (want one of {' '.join(COMPARE_OPS)})"
    if target == "value":
        if type(operand) is not bytes:
            return "a value compare needs a value"
    elif target == "exists":
        if type(operand) is not bool:
            return "an exists compare needs true or false"
        if op not in ("==", "!="):
            return "an exists compare takes == or != only"
    elif type(operand) is not int or operand < 0:
        return f"a {target} compare needs an integer >= 0"
    return None


def _op_problem(o: object) -> str | None:
    if (type(o) is not list or o[0:1] not in (["put"], ["delete"], ["get"])
            or len(o) != (4 if o[0] == "put" and len(o) == 4 else 3)):
        return "an op is put, delete or get"
    kind, key, third = o[:3]
    if len(o) == 4 and (type(o[3]) is not int or o[3] < 0):
        return "a put's lease is an id >= 0"
    if type(key) is not str or not key:
        return f"a {kind} needs a key (or a prefix) of at least one character"
    if kind == "put" and type(third) is not bytes:
        return "a put needs a value"
    if kind != "put" and type(third) is not bool:
        return f"a {kind} names a key or a prefix"
    return None


def txn_problem(body: object) -> str | None:
    """What is wrong with a TXN's body, or None. The body: [compares, success, failure], where a compare is
    [key, target, op, operand] (operand: bytes for "value", bool for "exists", an int >= 0 for the others) and an
    op is ["put", key, value], ["put", key, value, lease_id] (0: no lease), ["delete", key or prefix, is_prefix] or ["get", key or prefix, is_prefix]. The HTTP
    edge builds the body from JSON and asks this first; `apply` asks again, since the log is the contract."""
    if type(body) is not list or len(body) != 3 or not all(type(part) is list for part in body):
        return "a transaction is [compare, success, failure]: three lists"
    for name, part in zip(("compare", "success", "failure"), body):
        if len(part) > MAX_TXN_OPS:
            return f"{name} has {len(part)} items: at most {MAX_TXN_OPS}"
    for i, c in enumerate(body[0]):
        if (problem := _compare_problem(c)) is not None:
            return f"compare[{i}]: {problem}"
    for name, part in zip(("success", "failure"), body[1:]):
        if _plain_puts(part):
            continue
        put: set[str] = set()
        for i, o in enumerate(part):
            if (problem := _op_problem(o)) is not None:
                return f"{name}[{i}]: {problem}"
            if o[0] == "put":
                if o[1] in put:  # etcd refuses it too ("duplicate key given in txn request")
                    return f"{name}[{i}]: key {o[1]!r} is put twice in one branch"
                put.add(o[1])
    return None


def _plain_puts(ops: list) -> bool:
    """Whether every op is a valid put without a lease, of distinct keys (what _op_problem and txn_problem would
    accept): the common branch checked in one pass, without a call per op (every node checks every TXN it
    applies)."""
    for o in ops:
        if type(o) is not list or len(o) != 3 or o[0] != "put" or type(o[1]) is not str or not o[1] \
                or type(o[2]) is not bytes:
            return False
    return len({o[1] for o in ops}) == len(ops)


def _holds(current: object, op: str, operand: object) -> bool:
    if op == "==":
        return current == operand
    if op == "!=":
        return current != operand
    if op == "<":
        return current < operand  # type: ignore[operator]
    return current > operand  # type: ignore[operator]


KEY_TABLE_SHARDS = 64  # a power of two: a key's shard is hash(key) & (KEY_TABLE_SHARDS - 1)
# (KeyTable's methods; the loops that save its Python call a key take it the same way: _KeyTableBuild.add,
# KeyValueStore._puts, encode_state. A layout only, the same on every node: a key put elsewhere is not found.)
_SHARD_MASK = KEY_TABLE_SHARDS - 1
Record = tuple[bytes, int, int]


class _Shard(dict):
    """One of a KeyTable's dicts: a dict subclass only so that the garbage collector never untracks it. CPython
    (3.11; _PyDict_MaybeUntrack) untracks an exact dict whose keys and values are all untracked when a full
    collection sees it, and a (value, index, index) tuple of atomics is untracked by the first collection it
    survives; the next write stores a fresh (tracked) tuple, which tracks the dict again (MAINTAIN_TRACKING) into
    generation 0: one young collection then walked every record (30-150 ms at a million keys here), one of
    generation 1 again, and the next full collection, which untracked it again; and gc.freeze after start-up
    (server/tuning.py) missed it, untracked by the collection just before. A subclass is tracked from birth to
    death: frozen with the rest after start-up or at the end of a restore while serving (the runtime's
    CollectorHold freezes the restored state when the collector was on), else aged once into the oldest
    generation, where each full collection walks it. docs/BENCHMARKS.md, "The key table and the collector", has
    the figures."""

    __slots__ = ()


class KeyTable(MutableMapping[str, Record]):
    """The key table (`KeyValueStore.data`): a mapping key -> record held in KEY_TABLE_SHARDS dicts (`_Shard`, for
    the collector), a key in the one its hash picks. Why not one dict: a dict grows by copying itself whole into a
    table twice the size in one insert, and a restore fills a new table while the old one serves (`restoring`):
    at a million keys the copy past 699,050 keys held a step 41-60 ms (issue 13). CPython offers no way to size a
    dict ahead from Python without copying one as big (dict.fromkeys and update presize only from a dict or set
    of that many keys), so the table is cut instead: a shard's growth copies 1/64th of the table. A restore fills
    the shards one after another (`_KeyTableBuild`): filled together they would grow in the same few steps
    (their counts keep pace), as costly as one dict's. The price: each operation is a Python call, ~0.1 us more
    than a dict's (docs/BENCHMARKS.md). Iterates shard by shard (no order: the store's order is `keys`)."""

    __slots__ = ("shards",)

    def __init__(self, items: Mapping[str, Record] | Iterable[tuple[str, Record]] = ()) -> None:
        self.shards: list[_Shard] = [_Shard() for _ in range(KEY_TABLE_SHARDS)]
        for key, record in items.items() if isinstance(items, Mapping) else items:
            self.shards[hash(key) & _SHARD_MASK][key] = record

    def get(self, key: str, default: Any = None) -> Any:
        return self.shards[hash(key) & _SHARD_MASK].get(key, default)

    def __getitem__(self, key: str) -> Record:
        return self.shards[hash(key) & _SHARD_MASK][key]

    def __setitem__(self, key: str, record: Record) -> None:
        self.shards[hash(key) & _SHARD_MASK][key] = record

    def __delitem__(self, key: str) -> None:
        del self.shards[hash(key) & _SHARD_MASK][key]

    def pop(self, key: str, *default: Any) -> Any:
        return self.shards[hash(key) & _SHARD_MASK].pop(key, *default)

    def __contains__(self, key: object) -> bool:
        return key in self.shards[hash(key) & _SHARD_MASK]

    def __len__(self) -> int:
        return sum(map(len, self.shards))

    def __iter__(self) -> Iterator[str]:
        for shard in self.shards:
            yield from shard

    def __repr__(self) -> str:
        return f"KeyTable({dict(self.items())!r})"


class _KeyTableBuild:
    """A KeyTable filled by a restore without a step that grows many shards (see KeyTable): `add` puts each
    decoded pair in its shard's list, `filling` then fills the shards from their lists one after another, at most
    FILL_BATCH_KEYS pairs of one shard a step, so a step grows one shard at most. A key twice (damage) shows as a
    shard shorter than its list (ValueError)."""

    # ~0.2-1 us a pair at 1M keys (the keys' objects are read in hash order, scattered in memory: cache misses),
    # so ~0.5-2 ms a step, and ~8 steps a shard at 1M keys; 4x as many pairs took 5-9 ms (load 11).
    FILL_BATCH_KEYS = RESTORE_BATCH_KEYS

    def __init__(self) -> None:
        self.table = KeyTable()
        self.pending: list[tuple[list[str], list[Record]]] = [([], []) for _ in range(KEY_TABLE_SHARDS)]

    def add(self, keys: list[str], records: list[Record]) -> None:
        pending = self.pending
        for key, record in zip(keys, records):
            shard_keys, shard_records = pending[hash(key) & _SHARD_MASK]
            shard_keys.append(key)
            shard_records.append(record)

    def containers(self) -> list[Any]:
        """The dicts and lists holding what it built (`_freeing`)."""
        return [held for lists in self.pending for held in lists] + list(self.table.shards)

    def filling(self) -> Iterator[None]:
        """Fill the table, yielding before each batch."""
        for shard, (keys, records) in zip(self.table.shards, self.pending):
            most = self.FILL_BATCH_KEYS
            for start in range(0, len(keys), most):
                yield
                shard.update(zip(keys[start : start + most], records[start : start + most]))
            if len(shard) != len(keys):
                raise ValueError("a damaged key/value snapshot (a key twice)")
            keys.clear()  # freed as the table fills: a list holds a reference a pair
            records.clear()


class KeyValueStore:
    """The replicated state (see the module's rules); a raftlib.interfaces.StateMachine. `data` maps a key to its
    record (value, create_index, modify_index), indices as applied (`record` gives them as exposed); a create
    keeps one int object for both. Only new and deleted keys touch `keys`. `leases` maps a lease id to its Lease,
    `lease_of` a key to its lease id (a key not in it has lease 0). `on_event` is called with each Event,
    `on_lease` as the module's rules say."""

    def __init__(self, on_event: Callable[[Event], None] | None = None,
                 on_level_raised: Callable[[int], None] | None = None,
                 on_lease: Callable[[int, int | None], None] | None = None) -> None:
        self.data = KeyTable()
        self.keys = SortedList()
        self.admin_claims = AdminClaims()
        self.lease_of: dict[str, int] = {}
        self.leases: dict[int, Lease] = {}
        self.lease_ids = SortedList()  # the ids of `leases`, in step: GET /lease?after= bisects it (review, R6)
        self.feature_level = 1
        self.level_index = 0
        self.on_event = on_event
        self.on_lease = on_lease
        self.on_level_raised = on_level_raised  # called with the level at every raise (a snapshot is due)
        self._events: list[Event] = []  # the command's, handed to on_event once it applied whole
        # What a restore dropped before its end left (its half-built state, or the old state it was freeing): the
        # dicts and lists holding it, freed a batch per step by the next restore's first steps (`restoring`).
        self._garbage: list[Any] = []
        # The feature level of the snapshot whose restore began last (check_snapshot: a V4's, else 0): the cluster's
        # when it was taken, so every member's since. A node whose state is still the empty one it restores into
        # (a restart's own snapshot, or a joiner's first from the leader) counts it (raftlib.server.node).
        self.restoring_level = 0
        self._writer: SteppedSnapshotWriter | None = None  # the stepped snapshot open (one at a time), or None

    def get(self, key: str) -> bytes | None:
        record = self.data.get(key)
        return None if record is None else record[0]

    def record(self, key: str) -> tuple[bytes, int, int] | None:
        """(value, create_index, modify_index) with the indices as exposed, or None (the module's rules)."""
        record = self.data.get(key)
        if record is None:
            return None
        value, create_index, modify_index = record
        return value, self.exposed(create_index), self.exposed(modify_index)

    def exposed(self, index: int) -> int:
        """An index as exposed: max(index, level_index) from level 2 on; 0 below it, where a node that restored an
        old-format snapshot does not know it (the module's rules)."""
        return (index if index > self.level_index else self.level_index) if self.feature_level >= 2 else 0

    def __len__(self) -> int:
        return len(self.keys)  # in step with `data`, and one attribute read (KeyTable's sums its shards)

    def apply(self, index: int, command: bytes) -> object:
        result = self._apply(index, command)
        if self._events:
            events, self._events = self._events, []
            self._hand_over(index, events)
        return result

    def _hand_over(self, index: int, events: list[Event]) -> None:
        """Give the events of the entry at `index` (in order, all applied) to on_event, one call each; a subclass
        may hand them over in one call instead (raftlib.server.node.WatchedStore: the watch history's bulk
        work)."""
        for event in events:
            try:
                self.on_event(event)  # type: ignore[misc]  # events are only collected with an on_event
            except Exception:
                log.exception("on_event failed on a %s of %r at index %d (the state is applied whole)",
                              event.type, event.key, index)

    def _apply(self, index: int, command: bytes) -> object:
        try:
            op, key, value, expected = cbor2.loads(command)
        except Exception:
            log.error("skipping an undecodable command at index %d", index)
            return "error"
        if type(key) is not str:
            return "error"  # not written by this version (a list would not even hash)
        if op == SET or op == COMPARE_AND_SET or op == CREATE:
            if op == COMPARE_AND_SET:
                record = self.data.get(key)
                if (None if record is None else record[0]) != expected:
                    return "failed"
            elif op == CREATE and key in self.data:
                return "failed"
            self._puts(index, (("put", key, value),))
            return "ok"
        if op == DELETE:
            return "ok" if self._delete(index, key) else "missing"
        if op == ADMIN_CLAIM:
            if self._writer is not None:
                self._writer.keep_claims()
            return self.admin_claims.apply(key, expected)
        if op == SET_FEATURE_LEVEL:
            return self._set_feature_level(index, expected)
        if type(op) is int and op in LEVEL_2_OPS:
            if self.feature_level < 2:
                return "error"  # an older release applies it as nothing: so must this one, until the level is 2
            return self._apply_level_2(index, op, key, value, expected)
        return "ok"  # an unknown op (a newer version's command): applied as nothing

    def _apply_level_2(self, index: int, op: int, key: str, value: object, expected: object) -> object:
        if op == TXN:
            if txn_problem(expected) is not None:
                return "error"
            return self._txn(index, *expected)  # type: ignore[misc]
        if op == LEASE_GRANT:
            return self._grant(index, expected) if valid_ttl(expected) else "error"
        if op == LEASE_REVOKE:
            if type(expected) is not int:
                return "error"
            return self._drop_lease(index, expected, "delete") if expected in self.leases else "missing"
        if op == LEASE_EXPIRE:
            if type(expected) is not list or len(expected) > MAX_EXPIRE_BATCH or not all(
                    type(i) is int for i in expected):
                return "error"
            return self._expire(index, expected)
        if not key:
            return "error"
        if op == PUT_WITH_TTL:
            if type(value) is not bytes or not valid_ttl(expected):
                return "error"
            granted = self._grant(index, expected)
            if granted == "ok":
                self._puts(index, (("put", key, value),), index)
            return granted
        if op == SET_WITH_LEASE:
            if type(value) is not bytes or type(expected) is not int or expected < 0:
                return "error"
            refused = self._lease_refusal(key, expected)
            if refused is not None:
                return refused
            self._puts(index, (("put", key, value),), expected)
            return "ok"
        if op == DELETE_PREFIX:
            return self._delete_prefix(index, key)
        if type(expected) is not int or (op == SET_IF_INDEX and type(value) is not bytes):
            return "error"
        record = self.data.get(key)
        if op == DELETE_IF_INDEX and record is None:
            # prev_index 0 means "missing": it holds, and there is nothing to delete; any other N fails.
            return "missing" if expected == 0 else "failed"
        if (0 if record is None else self.exposed(record[2])) != expected:
            return "failed"
        if op == SET_IF_INDEX:
            self._puts(index, (("put", key, value),))
        else:
            self._delete(index, key)
        return "ok"

    def _set_feature_level(self, index: int, level: object) -> str:
        if type(level) is not int:
            return "error"
        if level <= self.feature_level:
            return "unchanged"  # the level never goes down (nor is it raised twice)
        if level > FEATURE_LEVEL:
            raise FeatureLevelTooHigh(
                f"the cluster's feature level is raised to {level} at index {index}, above this release's "
                f"{FEATURE_LEVEL}: this node cannot apply what follows; start a newer raftdzmq on its data dir")
        crossing = self.feature_level < 2
        self.feature_level = level
        if crossing:
            # Once: a later raise must not move the floor (older keys' exposed indices would jump).
            # Stored indices stay as they are (an O(keys) rewrite here held the loop ~1.5 s at 1M keys): every
            # reader takes them through `exposed`, and the V3 snapshot is written as exposed (encode_state).
            self.level_index = index
        if self.on_level_raised is not None:
            self.on_level_raised(level)  # every raise: a snapshot of the new level is due (the module's rules)
        return "ok"

    def _grant(self, index: int, ttl_seconds: int) -> str:
        if len(self.leases) >= MAX_LEASES:
            return "full"
        assert index not in self.leases, "a lease id is the index of its grant: used once"
        if self._writer is not None:
            self._writer.keep_lease(index)
        self.leases[index] = Lease(ttl_seconds)
        self.lease_ids.add(index)
        if self.on_lease is not None:
            self.on_lease(index, ttl_seconds)
        return "ok"

    def _lease_refusal(self, key: str, lease_id: int) -> NoLease | str | None:
        """Why `key` cannot be put on `lease_id` (0: no lease), or None."""
        if not lease_id:
            return None
        lease = self.leases.get(lease_id)
        if lease is None:
            return NoLease(lease_id)
        if len(lease.keys) >= MAX_KEYS_PER_LEASE and key not in lease.keys:
            return "lease full"
        return None

    def _expire(self, index: int, lease_ids: list[int]) -> int:
        """Expire the leases named that are still here, in order, while their keys fit in
        MAX_DELETE_KEYS_PER_ENTRY (the first always: a lease holds at most that many); the number expired. An id
        already gone (revoked, or expired by an earlier entry of another leader) is skipped."""
        budget, expired = MAX_DELETE_KEYS_PER_ENTRY, 0
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            if len(lease.keys) > budget:
                break  # the leader proposes the rest again
            budget -= self._drop_lease(index, lease_id, "expire")
            expired += 1
        return expired

    def _drop_lease(self, index: int, lease_id: int, kind: str) -> int:
        """Revoke ("delete" events) or expire ("expire" events) a lease that is there: its keys go, in key order.
        The number of keys deleted."""
        lease = self.leases[lease_id]
        keys = sorted(lease.keys)
        for key in keys:
            self._delete(index, key, kind)  # unlinks it from the lease
        assert not lease.keys, "every key of a dropped lease was unlinked by its delete"
        if self._writer is not None:
            self._writer.keep_lease(lease_id)
        del self.leases[lease_id]
        self.lease_ids.remove(lease_id)
        if self.on_lease is not None:
            self.on_lease(lease_id, None)
        return len(keys)

    def _link(self, key: str, lease_id: int) -> None:
        """Attach `key` to `lease_id` (0: to none), leaving the lease it had (etcd: a put sets the key's lease)."""
        old = self.lease_of.get(key, 0)
        if old == lease_id:
            return
        if old:
            self.leases[old].keys.discard(key)
            del self.lease_of[key]
        if lease_id:
            self.leases[lease_id].keys.add(key)
            self.lease_of[key] = lease_id

    def _puts(self, index: int, puts: Sequence[Sequence], lease_id: int = 0) -> None:
        """Put each of `puts` (a txn's put op: [put, key, value, ...], checked) at `index`, in order, on `lease_id`
        (0: none; a key leaves the lease it had, etcd's): a new key's record is (value, index, index), one int for
        both indices; a key there keeps its create index. Every put of the store comes here, one or a txn's branch
        of them, so that no kind of put can apply differently on some path (review of txnperf, Q2). A branch's puts
        in one loop, without a Python call a key but `exposed`: KeyTable's get and set (its shard looked up here, as
        KeyTable does) and a call a put were three more (docs/BENCHMARKS.md)."""
        if self._writer is not None:  # before the lease links below: the writer keeps the key's lease too
            for o in puts:
                self._writer.keep_key(o[1])
        if self.lease_of or lease_id:  # no dict lookup on the write path of a store without leases
            for o in puts:
                self._link(o[1], lease_id)
        shards, keys, exposed = self.data.shards, self.keys, self.exposed
        events = self._events if self.on_event is not None else None
        for o in puts:
            key, value = o[1], o[2]
            shard = shards[hash(key) & _SHARD_MASK]
            record = shard.get(key)
            if record is None:
                keys.add(key)
                shard[key] = (value, index, index)
                create_index = index
            else:
                create_index = record[1]
                shard[key] = (value, create_index, index)
            if events is not None:
                events.append(_new_event(Event, ("put", key, value, index, exposed(create_index))))

    def _delete(self, index: int, key: str, kind: str = "delete") -> bool:
        if self._writer is not None:
            self._writer.keep_key(key)
        record = self.data.pop(key, None)
        if record is None:
            return False
        self.keys.remove(key)
        if self.lease_of:
            self._link(key, 0)
        if self.on_event is not None:
            self._events.append(Event(kind, key, None, index, self.exposed(record[1])))
        return True

    def _prefixed(self, prefix: str, most: int) -> tuple[list[str], bool]:
        """The first `most` keys that start with `prefix`, in order (a copy: the caller may delete them), and
        whether more follow."""
        out: list[str] = []
        for key in self.keys.irange(minimum=prefix):
            if not key.startswith(prefix):
                break
            if len(out) == most:
                return out, True
            out.append(key)
        return out, False

    def _delete_prefix(self, index: int, prefix: str, most: int = MAX_DELETE_KEYS_PER_ENTRY) -> int:
        keys, _ = self._prefixed(prefix, most)
        for key in keys:
            self._delete(index, key)
        return len(keys)

    def _compare(self, key: str, target: str, op: str, operand: object) -> bool:
        """etcd's rules for a missing key: a value compare is false, whatever the op; its indices and lease are 0
        and it does not exist."""
        record = self.data.get(key)
        if target == "exists":
            return _holds(record is not None, op, operand)
        if target == "value":
            return record is not None and _holds(record[0], op, operand)
        if target == "lease":
            return _holds(self.lease_of.get(key, 0), op, operand)
        if record is None:
            return _holds(0, op, operand)
        return _holds(self.exposed(record[1] if target == "create_index" else record[2]), op, operand)

    def _txn(self, index: int, compares: list, success: list, failure: list) -> TxnResult | NoLease | str:
        # All compares against the state before the txn (etcd's), then the branch's ops in order.
        # The bounds (the module's rules) are budgets for the whole txn, spent in op order.
        succeeded = all(self._compare(*c) for c in compares)
        ops = success if succeeded else failure
        # A put naming a missing (or full) lease fails the whole txn before any op applies (etcd's): no op grants
        # a lease, so the leases there now are the ones every op would see. The count of a lease's keys is
        # checked one put at a time (a txn of many puts onto an almost full lease: see the loop).
        leased = [o for o in ops if len(o) == 4]  # puts naming a lease (0: none)
        for o in leased:
            if (refused := self._lease_refusal(o[1], o[3])) is not None:
                return refused
        if any(o[3] for o in leased) and not self._fits(leased):
            return "lease full"
        if not leased and all(o[0] == "put" for o in ops):  # the common branch: its puts in one call
            self._puts(index, ops)
            return TxnResult(succeeded, [("put", o[1]) for o in ops])
        results: list[tuple] = []
        delete_budget, get_keys_budget, get_bytes_budget = MAX_DELETE_KEYS_PER_ENTRY, MAX_TXN_GET_KEYS, MAX_TXN_GET_BYTES
        for o in ops:
            kind, key, third = o[0], o[1], o[2]
            if kind == "put":
                self._puts(index, (o,), o[3] if len(o) == 4 else 0)
                results.append(("put", key))
            elif kind == "delete":
                if not third:
                    results.append(("delete", int(self._delete(index, key)), False))
                    continue
                keys, more = self._prefixed(key, delete_budget)
                for k in keys:
                    self._delete(index, k)
                delete_budget -= len(keys)
                results.append(("delete", len(keys), more))
            else:
                found = []
                if third:
                    keys, more = self._prefixed(key, get_keys_budget)
                else:  # past the key bound a get of one key returns nothing, and says more if it exists
                    keys, more = ([key], False) if get_keys_budget else ([], key in self.data)
                for k in keys:
                    record = self.record(k)
                    if record is None:
                        continue
                    size = len(k) + len(record[0])
                    if size > get_bytes_budget:
                        more = True
                        get_keys_budget = 0  # the byte bound ends every later get too, whatever its sizes
                        break
                    get_bytes_budget -= size
                    get_keys_budget -= 1
                    found.append((k, *record))
                results.append(("get", found, more))
        return TxnResult(succeeded, results)

    def _fits(self, leased: list) -> bool:
        """Whether the txn's puts with a lease (`leased`, each [put, key, value, lease_id]) leave every lease within
        MAX_KEYS_PER_LEASE keys (an upper bound: a later op of the txn may take a key off again)."""
        added: dict[int, set[str]] = {}
        for o in leased:
            if o[3] and o[1] not in self.leases[o[3]].keys:
                added.setdefault(o[3], set()).add(o[1])
        return all(len(self.leases[i].keys) + len(keys) <= MAX_KEYS_PER_LEASE for i, keys in added.items())

    def page(self, prefix: str, after: str, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` keys that start with `prefix` and sort after `after`, in order, and whether more follow.
        Keys with a prefix are contiguous in sorted order, from the first key >= the prefix. By value (irange),
        not by position: positional lookups make SortedList keep an index that every later add and remove must
        update."""
        if after and after >= prefix:
            candidates = self.keys.irange(minimum=after, inclusive=(False, True))
        else:
            candidates = self.keys.irange(minimum=prefix)
        page: list[str] = []
        for key in candidates:
            if not key.startswith(prefix) or len(page) > limit:
                break
            page.append(key)
        return page[:limit], len(page) > limit

    def snapshot(self) -> bytes:
        """The whole state in the format its feature level calls for (`encode_state`). Run by a forked child on its
        copy of the state (raftlib.runtime), so its time is not the event loop's."""
        return encode_state(self)

    def begin_stepped_snapshot(self) -> SteppedSnapshotWriter | None:
        """A SteppedSnapshotWriter of the state as it is now (its bytes: `snapshot()`'s of now), or None below
        feature level 3 (V2 and V3 are written whole: `snapshot`). One at a time: a writer still open is closed."""
        if self.feature_level < 3:
            return None
        if self._writer is not None:
            self._writer.close()
        self._writer = SteppedSnapshotWriter(self)
        return self._writer

    def restore(self, data) -> None:
        """Replace the whole state with a snapshot's (empty bytes: the empty state): bytes, or a source with
        `len()` and `read(offset, length)` (raftlib.messages.SnapshotSource), in one go (start-up). Raises
        ValueError for a snapshot of an unknown format or a damaged one, changing nothing."""
        for _ in self.restoring(data):
            pass

    def restoring(self, data) -> Iterator[bool]:
        """`restore` a batch per step: notes the snapshot's level first (`restoring_level`; a damaged snapshot's
        refusal is left to the steps), then returns a generator that decodes a batch (RESTORE_BATCH_KEYS pairs, or
        RESTORE_BATCH_BYTES of values) each time it is advanced and yields False; once the state is replaced (the
        module's rules; not before), it yields True, then frees the old state a batch per step (freeing a million
        keys at once holds the loop too), yielding False, and ends. Dropping it before the True changes nothing.

        Dropped before its end (the runtime's restore replaced by a newer snapshot's, or its node stopped), it
        leaves what it built, or the old state it was freeing, in `_garbage`, and the next restore frees that
        first, a batch per step: dropped with its frames, a half-built table of a million keys was freed in one
        step of ~0.9 s (review of keyshard, L1)."""
        try:
            self.restoring_level = check_snapshot(data)
        except ValueError:
            pass
        return self._restoring_steps(data)

    def _restoring_steps(self, data) -> Iterator[bool]:
        """`restoring`'s generator."""
        for _ in _freeing(self._garbage):  # what a restore dropped before its end left
            yield False
        old_data, old_keys, old_lease_of, old_leases = self.data, self.keys, self.lease_of, self.leases
        building: list[Any] = []  # what `_decode` builds, in the order it builds it
        try:
            for _ in self._decode(data, building):
                yield False
        except GeneratorExit:  # dropped: its frames go, what they built stays, for the next restore to free
            self._garbage += [container for built in building for container in built.containers()]
            raise
        # Only this generator holds the old state now (readers look up self.data afresh at each request). Handed
        # to `_garbage` before this step ends: a drop from here on leaves the rest of it there too.
        self._garbage += [*old_data.shards, old_lease_of, old_leases, *_sublists_of(old_keys)]
        del old_data, old_keys, old_lease_of, old_leases, building
        yield True
        for _ in _freeing(self._garbage):
            yield False

    def _decode(self, data, building: list[Any]) -> Iterator[None]:
        """The decoding half of `restoring`: the heads parsed here, then a batch of key/value pairs per step read
        by a cbor2 decoder from a buffered reader (it reads exactly each item's bytes, so the heads and the pairs
        can be read in turn); the elements after the map checked, V3's leases a batch per step; the state replaced
        when it ends. What it builds goes in `building` as it is made (`restoring` frees it if dropped)."""
        size = len(data)
        if not size:
            empty = KeyTable()
            self._replace(empty, SortedList(), _tail_state(None, []), _LeaseTable(empty))
            return
        fp = _buffered(data)
        decoder = _decoder(fp)
        first = _read_exact(fp, 1)[0]
        name: str | None = None
        if first >> 5 == 4 and first & 31 in (4, 7):  # an array of 4 (V2) or 7 (V3); a V1's 3 go in one step
            decoded = _decode_item(decoder, "its format's name")
            name = decoded if type(decoded) is str else None
            if (decoded, first & 31) not in ((SNAPSHOT_WITH_CLAIMS_V2, 4), (SNAPSHOT_V3, 7), (SNAPSHOT_V4, 7)):
                raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
            first = _read_exact(fp, 1)[0]
        new = _KeyTableBuild()
        keys = _SortedBuild()  # without a sort while the keys come in increasing order (this version's)
        building += (new, keys)
        decode = decoder.decode
        with_indices = name in (SNAPSHOT_V3, SNAPSHOT_V4)
        if name == SNAPSHOT_V4:
            if first != 0x9F:
                raise ValueError("a key/value snapshot of an unknown format (V4's records not in chunks)")
            while not _at_break(fp):
                yield
                chunk_keys, chunk_records = _chunk_records(_decode_item(decoder, "a chunk of records"))
                new.add(chunk_keys, chunk_records)
                keys.extend(chunk_keys)
            left = 0
        else:
            count = _map_count(first, fp)
            if count is None:  # not a map of definite length: the older formats, a map of indefinite length, junk
                self._restore_whole(_whole(data))
                return
            left = count
        while left:
            yield
            # Keys out of order cost ~1.4 us more each (SortedList.add): half a batch then.
            most = min(left, RESTORE_BATCH_KEYS if keys.in_order else RESTORE_BATCH_KEYS // 2)
            batch_keys: list = []
            batch_records: list = []
            value_bytes = 0
            try:
                while len(batch_keys) < most and value_bytes < RESTORE_BATCH_BYTES:
                    batch_keys.append(decode())
                    record = _record(decode(), with_indices)
                    batch_records.append(record)
                    value_bytes += len(record[0])
            except cbor2.CBORError as e:
                _damaged(e, "a key or value does not decode")
            left -= len(batch_keys)
            if not all(type(k) is str for k in batch_keys):
                raise ValueError("a damaged key/value snapshot (a key that is not text)")
            new.add(batch_keys, batch_records)
            keys.extend(batch_keys)
        yield from new.filling()  # a key twice found here, before the elements after the map are read
        # The elements after the map: all but V3's leases in this step (bounded: the claims of CLAIM_RETENTION_SECONDS,
        # three numbers), checked before the leases; then the leases a batch per step (see the module's rules).
        tail_length = _TAIL_LENGTHS[name] - (1 if with_indices else 0)
        state = _tail_state(name, [_decode_item(decoder, "an element after its map") for _ in range(tail_length)])
        leases = _LeaseTable(new.table)
        building.append(leases)
        if with_indices:
            yield from leases.decoding(fp, decode)
        if fp.read(1):
            raise ValueError("a damaged key/value snapshot (bytes after its end)")
        self._replace(new.table, keys.sorted_list(), state, leases)

    def _restore_whole(self, data: bytes | bytearray | memoryview) -> None:
        """The formats decoded in one step (the module's rules)."""
        fp = io.BytesIO(data)
        first = fp.read(1)
        if first and first[0] >> 5 == 4:  # an array: V3's lease table is decoded as a restore by steps does
            length = None if first[0] == 0x9F else _head_count(first[0], fp, 4)
            if length in (None, 7) and _decode_item(_decoder(fp), "its format's name") == SNAPSHOT_V3:
                self._restore_whole_v3(fp, indefinite=length is None)
                return
        try:
            v = _decoder(io.BytesIO(data)).decode()
        except cbor2.CBORError as e:
            _damaged(e, "it does not decode")
        name = None
        tail: list = []
        if type(v) is list:
            name = v[0] if v else None
            if name == SNAPSHOT_WITH_CLAIMS and len(v) == 3:  # before the horizon was kept: it starts at 0
                v, tail = v[1], [v[2], 0]
                name = SNAPSHOT_WITH_CLAIMS_V2
            elif name == SNAPSHOT_WITH_CLAIMS_V2 and len(v) == 2 + _TAIL_LENGTHS[name]:
                v, tail = v[1], v[2:]
            else:
                raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
        records = _records_of(v, False)
        self._replace(records, SortedList(records), _tail_state(name, tail), _LeaseTable(records))

    def _restore_whole_v3(self, fp: io.BytesIO, indefinite: bool) -> None:
        """A V3 snapshot with a map of indefinite length (none of ours writes one), after its name, in one step:
        the map and the elements after it decoded whole, but the lease table by `_LeaseTable.decoding`, as a
        restore a batch per step takes it (cbor2, decoding a map whole, keeps the last of an id twice)."""
        decoder = _decoder(fp)
        v, *tail = [_decode_item(decoder, "an element of the snapshot") for _ in range(_TAIL_LENGTHS[SNAPSHOT_V3])]
        records = _records_of(v, True)
        state = _tail_state(SNAPSHOT_V3, tail)  # checked first: a newer level's snapshot says so
        leases = _LeaseTable(records)
        for _ in leases.decoding(fp, decoder.decode):
            pass
        if fp.read(1) != (b"\xff" if indefinite else b"") or fp.read(1):
            raise ValueError("a key/value snapshot of an unknown format (elements after its leases, or none)")
        self._replace(records, SortedList(records), state, leases)

    def _replace(self, data: KeyTable, keys: SortedList, state: _TailState, leases: _LeaseTable) -> None:
        """The one place the state is replaced: everything given was checked (a damaged snapshot raises before
        it gets here, so it changes nothing)."""
        assert len(keys) == len(data) and type(data) is KeyTable
        if self._writer is not None:
            self._writer.close()  # the state it was writing is gone: the runtime abandons that snapshot
        self.data = data
        self.keys = keys
        self.admin_claims = state.admin_claims
        self.leases = leases.leases
        self.lease_ids = leases.ids.sorted_list()
        self.lease_of = leases.lease_of
        self.feature_level, self.level_index = state.feature_level, state.level_index


# The elements after the map, by format name (None: a plain map). A later level's (leases) adds its own here.
_TAIL_LENGTHS: dict[str | None, int] = {None: 0, SNAPSHOT_WITH_CLAIMS_V2: 2, SNAPSHOT_V3: 5, SNAPSHOT_V4: 5}


class _TailState(NamedTuple):
    admin_claims: AdminClaims
    feature_level: int
    level_index: int


def _tail_state(name: object, tail: list) -> _TailState:
    """The state a snapshot holds after its map but for V3's leases (its last element: `_LeaseTable`), checked:
    raises ValueError before anything is replaced. The one place that knows those elements (the module's
    rules)."""
    if name is None:
        return _TailState(AdminClaims(), 1, 0)
    claims = _admin_claims(tail[0], tail[1])
    if name == SNAPSHOT_WITH_CLAIMS_V2:
        return _TailState(claims, 1, 0)
    feature_level, level_index = tail[2], tail[3]
    lowest_level = 3 if name == SNAPSHOT_V4 else 2  # the level each is written from (encode_state)
    if type(feature_level) is not int or feature_level < lowest_level or not _is_index(level_index):
        raise ValueError(f"a key/value snapshot of an unknown format (a damaged {'V4' if lowest_level == 3 else 'V3'})")
    if feature_level > FEATURE_LEVEL:
        raise ValueError(f"a key/value snapshot of feature level {feature_level}, above this release's "
                         f"{FEATURE_LEVEL}: start a newer raftdzmq on this data dir")
    return _TailState(claims, feature_level, level_index)


def _record(x: object, with_indices: bool) -> tuple[bytes, int, int]:
    """A map's value as stored: V3's [value, create_index, modify_index] checked; an older format's value, with
    indices of 0 (the module's rules)."""
    if not with_indices:
        if type(x) is not bytes:
            raise ValueError("a damaged key/value snapshot (a value that is not bytes)")
        return x, 0, 0
    if (type(x) is not list or len(x) != 3 or type(x[0]) is not bytes or not _is_index(x[1])
            or not _is_index(x[2]) or x[1] > x[2]):
        raise ValueError("a damaged key/value snapshot (a record that is not [value, create <= modify])")
    value, create_index, modify_index = x
    # One int object for both indices when they are equal, as a create makes them (memory per key).
    return value, create_index, create_index if modify_index == create_index else modify_index


def _is_index(x: object) -> bool:
    return type(x) is int and x >= 0


_KNOWN_NAMES = frozenset((SNAPSHOT_WITH_CLAIMS, SNAPSHOT_WITH_CLAIMS_V2, SNAPSHOT_V3, SNAPSHOT_V4))


def check_snapshot(data) -> int:
    """What a restore of `data` (bytes or a SnapshotSource) would refuse for its format, checked without restoring:
    a format's name this release does not know (a newer raftdzmq's), and a V4's structure and the elements after
    its records (`_tail_state`: a damaged V4, or one of a feature level above FEATURE_LEVEL), its chunks skipped by
    their heads' lengths (~500 heads at 1,000,000 keys). Raises ValueError as the restore would. A node checks its
    own snapshot so before it binds a port (raftlib.server.node): it restores it by steps while it runs, and the
    restore found the level only after its last chunk, the node having voted and appended into a newer release's
    data dir meanwhile (review of fastrestore, Q1). What this leaves to the restore (a damaged record or V3
    map, V3's elements after its map) a release that wrote the file would not write either.

    Returns a V4's feature level (3 or more: the cluster's when it was taken, so every member's since), else 0
    (an older format: written below level 3; its level is not read)."""
    if not len(data):
        return 0
    fp = _buffered(data, CHECK_BUFFER_BYTES)
    first = _read_exact(fp, 1)[0]
    if first >> 5 != 4 or first == 0x80:  # not an array, or an empty one: the restore decides
        return 0
    name = _decode_item(_decoder(fp), "its format's name")
    if type(name) is str and name not in _KNOWN_NAMES:
        raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
    if name != SNAPSHOT_V4:
        return 0
    if first != 0x87 or _read_exact(fp, 1) != b"\x9f":
        raise ValueError("a key/value snapshot of an unknown format (V4's records not in chunks)")
    while not _at_break(fp):
        head = _read_exact(fp, 1)[0]
        length = _head_count(head, fp, 2)  # a chunk is a byte string of definite length
        if length is None or not _skip(fp, length):
            raise ValueError("a damaged key/value snapshot (a chunk of records cut or not a byte string)")
    decoder = _decoder(fp)
    return _tail_state(SNAPSHOT_V4, [_decode_item(decoder, "an element after its records")
                                     for _ in range(_TAIL_LENGTHS[SNAPSHOT_V4] - 1)]).feature_level


def _skip(fp, length: int) -> bool:
    """Move `fp` `length` bytes on without reading them; False when fewer were left (it is at the end then)."""
    start = fp.tell()
    end = fp.seek(0, io.SEEK_END)
    fp.seek(min(start + length, end))
    return start + length <= end


def encode_state(kv: KeyValueStore) -> bytes:
    """The snapshot of `kv` in the format its feature level calls for (the module's rules): the array's and the
    map's heads written here, the pairs in key order a batch per cbor2 call, V3's indices as exposed. The same
    bytes as cbor2.dumps of the whole, on every node whatever the order its keys were inserted in."""
    claims = kv.admin_claims
    data = kv.data
    out = io.BytesIO()
    if kv.feature_level >= 2:
        leases = {i: [lease.ttl_seconds, sorted(lease.keys)] for i, lease in sorted(kv.leases.items())}
        name = SNAPSHOT_V4 if kv.feature_level >= 3 else SNAPSHOT_V3
        tail = [claims.claims, claims.horizon, kv.feature_level, kv.level_index, leases]
    else:
        name, tail = SNAPSHOT_WITH_CLAIMS_V2, [claims.claims, claims.horizon]
    out.write(_head(4, 2 + len(tail)))
    out.write(cbor2.dumps(name))
    if name == SNAPSHOT_V4:
        _write_chunks(out, kv)
        for item in tail:
            out.write(cbor2.dumps(item))
        return out.getvalue()
    out.write(_head(5, len(data)))
    level_index = kv.level_index
    with_indices = name == SNAPSHOT_V3
    # Each key looked up in its shard here: KeyTable's [] is a Python call a key (review of keyshard, L2).
    shards, mask = data.shards, _SHARD_MASK
    flat: list = []
    for key in kv.keys:  # by iteration: a positional slice would make SortedList keep an index (see `page`)
        value, create_index, modify_index = shards[hash(key) & mask][key]
        flat.append(key)
        if with_indices:
            flat.append([value, create_index if create_index > level_index else level_index,
                         modify_index if modify_index > level_index else level_index])
        else:
            flat.append(value)
        if len(flat) == 2 * RESTORE_BATCH_KEYS:
            _write_items(out, flat)
            flat = []
    _write_items(out, flat)
    for item in tail:
        out.write(cbor2.dumps(item))
    return out.getvalue()


def _write_chunks(out: io.BytesIO, kv: KeyValueStore) -> None:
    """V4's records (the module's rules): an array of indefinite length of byte strings, each the CBOR of a flat
    array [key, value, create_index, modify_index, ...] (indices as exposed) of at most RESTORE_BATCH_KEYS records,
    ended once its values pass RESTORE_BATCH_BYTES: what one restore step decodes, in one cbor2 call."""
    data, level_index = kv.data, kv.level_index
    out.write(b"\x9f")
    flat: list = []
    value_bytes = 0
    for key in kv.keys:  # by iteration, as encode_state
        value, create_index, modify_index = data[key]
        flat += (key, value, create_index if create_index > level_index else level_index,
                 modify_index if modify_index > level_index else level_index)
        value_bytes += len(value)
        if len(flat) == 4 * RESTORE_BATCH_KEYS or value_bytes >= RESTORE_BATCH_BYTES:
            _write_chunk(out, flat)
            flat, value_bytes = [], 0
    if flat:
        _write_chunk(out, flat)
    out.write(b"\xff")


def _write_chunk(out: io.BytesIO, flat: list) -> None:
    chunk = cbor2.dumps(flat)
    out.write(_head(2, len(chunk)))
    out.write(chunk)


def _write_items(out: io.BytesIO, items: list) -> None:
    """`items` encoded one after another: one cbor2 call (C speed), without the head of the array it encodes."""
    if items:
        out.write(memoryview(cbor2.dumps(items))[len(_head(4, len(items))):])


def _head(major: int, count: int) -> bytes:
    """The head of a CBOR item of major type `major` and length `count` (RFC 8949 3.1, its shortest form)."""
    if count < 24:
        return bytes([major << 5 | count])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if count < 1 << (8 * width):
            return bytes([major << 5 | info]) + count.to_bytes(width, "big")
    raise ValueError(f"a CBOR length of {count}")


class SteppedSnapshotWriter:
    """The V4 snapshot of a KeyValueStore as it was when the writer was begun (`begin_stepped_snapshot`), written
    a bounded piece at a time while the store goes on applying commands between the pieces: the same bytes as
    `encode_state` of the store at the begin (issue 13: a snapshot without fork's pause).

    Rules:
    - A copy-on-write view at the key level with a cursor: `step` walks `kv.keys` in order from the last key it
      wrote (`cursor`), a new `irange` a step (never an iterator held across steps). Before the store changes a
      key (its record, its existence, its lease) beyond the cursor, it calls `keep_key`, which stashes the key's
      record and lease id as they were at the begin, once (a key absent at the begin stashed as absent); a step
      merges the store's keys with the stashed keys that existed at the begin and writes each key's begin-time
      record. Keys at or before the cursor are written already: their changes need nothing.
    - The leases (V4's last element, `{id: [ttl, sorted(keys)]}`): each key's begin-time lease is noted as the
      key is written, so that every lease's keys are gathered in key order; the lease map is then written a step
      at a time in id order from the store's ids merged with the ids stashed by `keep_lease` (called before a
      grant or a drop: a lease's TTL never changes, its keys go through `keep_key`). Their number is the
      begin's.
    - The admin claims are copied by `keep_claims` before the first claim applies after the begin (then the
      copy is written); the feature level and level index are read at the begin (a level raise changes neither
      the V4 format nor, above 2, the level index).
    - The store calls the hooks from the one place each change is made (`_puts`, `_delete`, `_grant`,
      `_drop_lease`, an ADMIN_CLAIM): every command, txn, prefix delete, lease expiry and revoke goes through
      them. A restore that replaces the state closes the writer (`closed`: its snapshot is abandoned).
    - A step's work is bounded by `max_items` whatever changed meanwhile: it takes at most that many names (keys
      or lease ids) in all, from the store's and the stash's merged (a name skipped as created after the begin
      counts as one written; 400k keys deleted ahead of the cursor made a 210 ms step when the stash's were not
      counted, the review of stepped, L1), fewer once their values pass SNAPSHOT_STEP_BYTES; a lease step also
      ends once its leases' keys pass RESTORE_BATCH_KEYS (a lease has up to MAX_KEYS_PER_LEASE).
    - The stash holds only what changed while the writer runs. The keys' stash is freed once the keys are
      written, a batch per step (`_freeing`'s bound: 1M stashed keys freed at once took 45 ms) before the first
      lease step; `close` frees what is left at once (a snapshot abandoned: rare)."""

    _KEYS, _LEASES, _DONE = 0, 1, 2

    def __init__(self, kv: KeyValueStore) -> None:
        self.kv = kv
        self.feature_level, self.level_index = kv.feature_level, kv.level_index
        self.claims: AdminClaims | None = None  # a copy of the begin's, once a claim applies after the begin
        self.lease_count = len(kv.leases)
        self.phase = self._KEYS
        self.closed = False
        self.cursor: str | None = None  # the last key written (None: none yet)
        self.kept: dict[str, tuple[Record, int] | None] = {}  # key -> (record, lease id) at the begin; None: absent
        self.kept_present = SortedList()  # the kept keys that existed at the begin
        self.stash_freeing: Iterator[None] | None = None  # the keys' stash freed a batch a step (`_freeing`)
        self.lease_cursor = 0  # the last lease id written (ids are >= 1)
        self.kept_leases: dict[int, int | None] = {}  # lease id -> its TTL at the begin; None: absent
        self.kept_leases_present = SortedList()
        self.lease_keys: dict[int, list[str]] = {}  # a lease id -> its begin-time keys written so far, in order
        self.flat: list = []  # the chunk being filled (`_write_chunks`' rule)
        self.value_bytes = 0
        self.out = io.BytesIO()  # the bytes made since the last step returned
        self.out.write(_head(4, 2 + _TAIL_LENGTHS[SNAPSHOT_V4]) + cbor2.dumps(SNAPSHOT_V4) + b"\x9f")

    @property
    def done(self) -> bool:
        """Every byte of the snapshot has been returned by `step`."""
        return self.phase == self._DONE

    def keep_key(self, key: str) -> None:
        """The store is about to change `key`: stash what it was at the begin, if the writer still has to write it."""
        if self.phase != self._KEYS or key in self.kept or (self.cursor is not None and key <= self.cursor):
            return
        kv = self.kv
        record = kv.data.get(key)
        if record is None:
            self.kept[key] = None
        else:
            self.kept[key] = (record, kv.lease_of.get(key, 0))
            self.kept_present.add(key)

    def keep_lease(self, lease_id: int) -> None:
        """The store is about to grant or drop `lease_id`: stash its TTL at the begin (or its absence)."""
        if self.phase == self._DONE or lease_id in self.kept_leases or lease_id <= self.lease_cursor:
            return
        lease = self.kv.leases.get(lease_id)
        self.kept_leases[lease_id] = None if lease is None else lease.ttl_seconds
        if lease is not None:
            self.kept_leases_present.add(lease_id)

    def keep_claims(self) -> None:
        """A claim is about to apply: keep the begin's claims, if they are still to be written."""
        if self.phase == self._KEYS and self.claims is None:
            claims = self.kv.admin_claims
            self.claims = AdminClaims(claims.claims, claims.horizon)

    def step(self, max_items: int) -> bytes:
        """Write up to `max_items` more keys (or leases), fewer once their values pass SNAPSHOT_STEP_BYTES (their
        keys RESTORE_BATCH_KEYS), or free a batch of the keys' stash (the class's rules); the snapshot's bytes made
        by this step (maybe none: a chunk not full yet). Nothing once `done` or `closed`."""
        if self.closed or self.phase == self._DONE:
            return b""
        if self.phase == self._KEYS:
            self._keys_step(max_items)
        else:
            self._leases_step(max_items)
        out, self.out = self.out, io.BytesIO()
        return out.getvalue()

    def close(self) -> None:
        """Stop: free the stash; the store calls no hook of it any more. A writer closed before `done` wrote an
        unfinished snapshot (a restore replaced the state, or its runtime abandoned it)."""
        if self.kv._writer is self:
            self.kv._writer = None
        self.closed = not self.done
        self.kept, self.kept_present, self.kept_leases, self.kept_leases_present = {}, SortedList(), {}, SortedList()
        self.lease_keys, self.flat, self.stash_freeing = {}, [], None

    def _keys_step(self, max_keys: int) -> None:
        kv = self.kv
        cursor = self.cursor
        names, last_step = _next_names(kv.keys, self.kept_present, cursor, max_keys)
        kept, shards, lease_of, level_index = self.kept, kv.data.shards, kv.lease_of, self.level_index
        flat, value_bytes, lease_keys = self.flat, self.value_bytes, self.lease_keys
        step_bytes = 0
        for n, key in enumerate(names):
            if step_bytes >= SNAPSHOT_STEP_BYTES:  # the rest in the next step, from the cursor
                names, last_step = names[:n], False
                break
            if key in kept:
                was = kept[key]
                if was is None:  # created after the begin
                    continue
                (value, create_index, modify_index), lease_id = was
            else:
                value, create_index, modify_index = shards[hash(key) & _SHARD_MASK][key]
                lease_id = lease_of.get(key, 0) if lease_of else 0
            flat += (key, value, create_index if create_index > level_index else level_index,
                     modify_index if modify_index > level_index else level_index)
            if lease_id:
                lease_keys.setdefault(lease_id, []).append(key)
            value_bytes += len(value)
            step_bytes += len(value)
            if len(flat) == 4 * RESTORE_BATCH_KEYS or value_bytes >= RESTORE_BATCH_BYTES:  # `_write_chunks`' rule
                _write_chunk(self.out, flat)
                flat, value_bytes = [], 0
        self.flat, self.value_bytes = flat, value_bytes
        if names:
            self.cursor = names[-1]
        if not last_step:
            return
        if flat:
            _write_chunk(self.out, flat)
        self.flat = []
        self.out.write(b"\xff")
        claims = self.claims if self.claims is not None else kv.admin_claims
        for item in (claims.claims, claims.horizon, self.feature_level, self.level_index):
            self.out.write(cbor2.dumps(item))
        self.out.write(_head(5, self.lease_count))
        self.phase = self._LEASES
        self.stash_freeing = _freeing([self.kept, *_sublists_of(self.kept_present)])
        self.kept, self.kept_present = {}, SortedList()

    def _leases_step(self, max_leases: int) -> None:
        if self.stash_freeing is not None:
            for _ in self.stash_freeing:
                return  # this step freed a batch of the keys' stash
            self.stash_freeing = None
        kv = self.kv
        ids, last_step = _next_names(kv.lease_ids, self.kept_leases_present, self.lease_cursor, max_leases)
        items: list = []
        keys_here = 0
        for n, lease_id in enumerate(ids):
            if keys_here >= RESTORE_BATCH_KEYS:  # the rest in the next step, from the cursor
                ids, last_step = ids[:n], False
                break
            if lease_id in self.kept_leases:
                ttl = self.kept_leases[lease_id]
                if ttl is None:  # granted after the begin
                    continue
            else:
                ttl = kv.leases[lease_id].ttl_seconds
            keys = self.lease_keys.pop(lease_id, [])
            keys_here += len(keys)
            items += (lease_id, [ttl, keys])
        _write_items(self.out, items)
        if ids:
            self.lease_cursor = ids[-1]
        if last_step:
            assert not self.lease_keys, "every key's begin-time lease was there at the begin"
            self.phase = self._DONE
            self.close()


def _next_names(names: SortedList, kept_present: SortedList, cursor: Any, max_items: int) -> tuple[list[Any], bool]:
    """A stepped snapshot's next names past `cursor` (exclusive; None: from the first), in order: the store's
    (`names`) merged with the stashed ones that existed at the begin (`kept_present`), at most `max_items` in all
    (each list read up to `max_items` only: never every stashed name ahead); and whether they are the last."""
    current = list(islice(names.irange(minimum=cursor, inclusive=(False, True)), max_items))
    kept_here = list(islice(kept_present.irange(minimum=cursor, inclusive=(False, True)), max_items))
    merged = sorted(set(current).union(kept_here)) if kept_here else current
    full = len(current) == max_items or len(kept_here) == max_items
    # A name past a full list's last may come before another unread one of that list; the cut to `max_items`
    # drops every such name: the full list's own `max_items` names all come at or before its last.
    if len(merged) > max_items:
        return merged[:max_items], False
    return merged, not full


def _admin_claims(claims: object, horizon: object) -> AdminClaims:
    """A snapshot's claims and horizon, checked (signature text -> finite timestamp; a finite horizon): raises
    ValueError for anything else, before the state is touched (second review of snapfork, finding 4)."""
    if type(claims) is not dict or not all(type(s) is str and _finite(t) for s, t in claims.items()):
        raise ValueError("a damaged key/value snapshot (its admin claims are not {signature: timestamp})")
    if not _finite(horizon):
        raise ValueError(f"a damaged key/value snapshot (an admin claims horizon of {horizon!r})")
    return AdminClaims({s: float(t) for s, t in claims.items()}, float(horizon))  # type: ignore[arg-type]


def _finite(x: object) -> bool:
    if type(x) is not int and type(x) is not float:
        return False
    try:
        f = float(x)
    except OverflowError:  # an int past float's range
        return False
    return f - f == 0  # neither infinite nor NaN


class _EveryTagRefused(dict):
    """cbor2's semantic_decoders for every tag number: each refuses its tag (the module's rules). Its decoders get
    the tag's content already decoded (cbor2 6.3), so the innermost tag of a nest is refused before any semantic
    work, and the work done is linear in the input's size. raftlib/codec.py refuses tags in Raft frames alike."""

    def __contains__(self, tag: object) -> bool:
        return True

    def __getitem__(self, tag: object):
        return _refuse_tag

    def get(self, tag: object, default: object = None):
        return _refuse_tag


def _refuse_tag(*_: object) -> object:
    raise cbor2.CBORDecodeError("a CBOR tag (no snapshot format has one)")


def _refuse_unknown_tag(tag: cbor2.CBORTag, immutable: bool) -> object:  # cbor2 6's tag_hook
    raise cbor2.CBORDecodeError(f"a CBOR tag {tag.tag} (no snapshot format has one)")


_NO_TAGS = _EveryTagRefused()


def _decoder(fp: io.BufferedIOBase) -> cbor2.CBORDecoder:
    """A cbor2 decoder of snapshot bytes that refuses every tag (the module's rules)."""
    # A buffered binary reader is an IO[bytes] to cbor2, whose stubs want the typing name.
    return cbor2.CBORDecoder(fp, semantic_decoders=_NO_TAGS, tag_hook=_refuse_unknown_tag)  # type: ignore[arg-type]


def _damaged(e: cbor2.CBORError, what: str) -> NoReturn:
    """Raise what a cbor2 error stands for: the source's own error (cbor2 wraps an error of the reader inside a
    nested item: an I/O error, SnapshotUnreadable) as it is, or else a damaged snapshot (ValueError)."""
    cause: BaseException | None = e
    seen = 0
    while cause is not None and seen < 16:
        if not isinstance(cause, cbor2.CBORError):
            raise cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    raise ValueError(f"a damaged key/value snapshot ({what}: {e})") from None


# check_snapshot's read buffer: it reads a head after each of V4's chunks (~250 KB apart), and a read after a seek
# past the buffer fills it anew. With the restore's 64 KiB it read 31 MB at 1,000,000 keys, twice at a start
# (before the node binds, and as its restore begins): 150-750 ms of wall time on a loaded machine (restart1m).
CHECK_BUFFER_BYTES = 512


def _buffered(data, buffer_bytes: int = 1 << 16) -> io.BufferedIOBase:
    """A snapshot's bytes, or a SnapshotSource (`len()`, `read(offset, length)`), as a buffered reader."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    return io.BufferedReader(_SourceReader(data), buffer_bytes)
class _SourceReader(io.RawIOBase):
    """A SnapshotSource read from its start (its errors, e.g. SnapshotUnreadable, go up as they are)."""

    def __init__(self, source) -> None:
        super().__init__()
        self.source, self.offset, self.size = source, 0, len(source)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # `check_snapshot` skips V4's chunks
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.offset = max(0, offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.offset, io.SEEK_END: self.size}[whence])
        return self.offset

    def readinto(self, buffer) -> int:
        chunk = self.source.read(self.offset, min(len(buffer), self.size - self.offset)) if self.offset < self.size \
            else b""
        buffer[: len(chunk)] = chunk
        self.offset += len(chunk)
        return len(chunk)


def _read_exact(fp, length: int) -> bytes:
    got = fp.read(length)
    if len(got) != length:
        raise ValueError("a damaged key/value snapshot (it ends inside a head)")
    return got


def _decode_item(decoder: cbor2.CBORDecoder, what: str) -> object:
    try:
        return decoder.decode()
    except cbor2.CBORError as e:
        _damaged(e, f"{what} does not decode")


def _map_count(first: int, fp) -> int | None:
    """The number of pairs of a CBOR map of definite length whose initial byte is `first` (RFC 8949 3.1: major type
    5, the count in the additional information or the 1, 2, 4 or 8 bytes after it), read from `fp`; None when
    `first` is not the head of such a map."""
    return _head_count(first, fp, 5)


def _head_count(first: int, fp, major_type: int) -> int | None:
    """`_map_count` for an item of `major_type` (4: an array, 5: a map)."""
    if first >> 5 != major_type:
        return None
    info = first & 31
    if info < 24:
        return info
    if info > 27:  # 31: a map of indefinite length; 28-30: reserved
        return None
    return int.from_bytes(_read_exact(fp, 1 << (info - 24)), "big")


class _SortedRun:
    """A SortedList built from items that come in increasing order, in O(n) with no sort: its sublists are laid
    out as SortedList lays them (`_lists` of at most its load, `_maxes` their last items). Relies on
    sortedcontainers' layout (2.x, unchanged since 2016); a SortedList without it is built by sorting instead."""

    def __init__(self) -> None:
        self.lists: list[list[Any]] = []
        self.count = 0
        self.last: Any = None
        probe = SortedList()
        self.load = getattr(probe, "_load", 0)
        self.laid_out = bool(self.load) and all(hasattr(probe, a) for a in ("_lists", "_maxes", "_len", "_index"))

    def extend(self, items: list[Any]) -> int:
        """Append the longest prefix of `items` that keeps them strictly increasing (or the layout, and `page`,
        would be wrong); returns its length."""
        last = self.last
        taken = 0
        for item in items:
            if taken + self.count and not item > last:
                items = items[:taken]
                break
            last = item
            taken += 1
        self.last = last
        self.count += len(items)
        load = self.load or 1000
        if self.lists and len(self.lists[-1]) < load:
            tail = self.lists[-1]
            room = load - len(tail)
            tail.extend(items[:room])
            items = items[room:]
        for i in range(0, len(items), load):
            self.lists.append(items[i : i + load])
        return taken

    def sorted_list(self) -> SortedList:
        if not self.laid_out:
            return SortedList(item for sub in self.lists for item in sub)
        out = SortedList()
        out._lists = self.lists
        out._maxes = [sub[-1] for sub in self.lists]
        out._len = self.count
        out._index = []
        return out


def _sublists_of(keys: SortedList | None) -> list[Any]:
    """A SortedList's list of sublists (for `_freeing`), or none if sortedcontainers lays it out otherwise."""
    lists = getattr(keys, "_lists", None)
    return [lists] if type(lists) is list else []


def _freeing(garbage: list[Any]) -> Iterator[None]:
    """Empty the dicts and lists in `garbage`, the first first, yielding after each batch: at most 2 *
    RESTORE_BATCH_KEYS items (a lease counting its keys, a sublist its items) and 2 * RESTORE_BATCH_BYTES of
    records' values (a stash's records too). Freeing a million keys at once holds the loop as long as decoding them. Emptied in place, and
    each leaves `garbage` once empty: a generator dropped midway leaves the rest there (`restoring`)."""
    while garbage:
        container = garbage[0]
        freed_items = freed_bytes = 0
        while container and freed_items < 2 * RESTORE_BATCH_KEYS and freed_bytes < 2 * RESTORE_BATCH_BYTES:
            item = container.popitem()[1] if isinstance(container, dict) else container.pop()
            if type(item) is tuple:  # a record (value, create_index, modify_index), or a stash's (record, lease id)
                record = item[0] if type(item[0]) is tuple else item
                freed_bytes += len(record[0])
            elif type(item) is list:  # a sorted list's sublist
                freed_items += len(item)
            elif type(item) is Lease:
                freed_items += len(item.keys)
            freed_items += 1
        if not container:
            del garbage[0]
        if freed_items:
            yield


class _SortedBuild:
    """The keys (or lease ids) of a snapshot as a SortedList, built as they are decoded: by layout while they come
    in increasing order (`_SortedRun`, this version's writers), from the first one out of order (older writers
    wrote the map in insertion order) by insertion, O(log n) each (the caller then takes half a batch a step)."""

    def __init__(self) -> None:
        self.run: _SortedRun | None = _SortedRun()
        self.unordered: SortedList | None = None

    @property
    def in_order(self) -> bool:
        return self.run is not None

    def extend(self, items: list[Any]) -> None:
        if self.run is not None:
            taken = self.run.extend(items)
            if taken == len(items):
                return
            self.unordered, self.run = self.run.sorted_list(), None
            items = items[taken:]
        assert self.unordered is not None
        for item in items:  # O(log n) each: ~1.4 us
            self.unordered.add(item)

    def containers(self) -> list[Any]:
        """The lists holding what it built (`_freeing`)."""
        return [self.run.lists] if self.run is not None else _sublists_of(self.unordered)

    def sorted_list(self) -> SortedList:
        if self.run is not None:
            return self.run.sorted_list()
        assert self.unordered is not None
        return self.unordered


class _LeaseTable:
    """A V3 snapshot's seventh element (a map lease id -> [ttl_seconds, [its keys]]) as it is decoded, lease by
    lease, each checked as it comes: an id >= 1 (an int) and once, a valid TTL, keys that are text, records of
    `records` and on no other lease, at most MAX_KEYS_PER_LEASE of them, and at most MAX_LEASES leases. `leases`,
    `lease_of` and the ordered ids are built as they come, so the restore's last step has no pass over the table to
    make (the module's rules)."""

    def __init__(self, records: KeyTable) -> None:
        self.records = records
        self.leases: dict[int, Lease] = {}
        self.lease_of: dict[str, int] = {}
        self.ids = _SortedBuild()

    def containers(self) -> list[Any]:
        """The dicts and lists holding what it built (`_freeing`; `records` is the key table's build's)."""
        return [self.lease_of, self.leases, *self.ids.containers()]

    def add(self, lease_id: object, ttl_keys: object) -> int:
        """One lease, checked and taken (its id still to be given to `ids`): returns its number of keys."""
        if type(lease_id) is not int:
            raise ValueError("a key/value snapshot of an unknown format (a lease id that is not an integer)")
        if len(self.leases) >= MAX_LEASES:  # a grant beyond them applies as "full": no state holds more
            raise ValueError(f"a damaged key/value snapshot (more than {MAX_LEASES} leases)")
        if (lease_id < 1 or lease_id in self.leases or type(ttl_keys) is not list or len(ttl_keys) != 2
                or not valid_ttl(ttl_keys[0]) or type(ttl_keys[1]) is not list
                or len(ttl_keys[1]) > MAX_KEYS_PER_LEASE):  # a put onto a full lease applies as "lease full"
            raise ValueError(f"a key/value snapshot of an unknown format (a damaged lease {lease_id!r})")
        records, lease_of = self.records, self.lease_of
        if not all(type(k) is str and k in records and k not in lease_of for k in ttl_keys[1]) or len(
                keys := set(ttl_keys[1])) != len(ttl_keys[1]):  # text first: a set of lists would raise TypeError
            raise ValueError(f"a key/value snapshot of an unknown format (a damaged lease {lease_id!r})")
        self.leases[lease_id] = Lease(ttl_keys[0], keys)
        for key in keys:
            lease_of[key] = lease_id
        return len(keys)

    def decoding(self, fp, decode: Callable[[], object]) -> Iterator[None]:
        """Decode the lease map at `fp` (its head read here; its leases with `decode`, the snapshot's decoder's)
        and take its leases, yielding before each batch: until RESTORE_BATCH_LEASES leases or RESTORE_BATCH_LEASES
        of their keys (half while the ids come out of order), so a step's work is bounded (a lease holds at most
        MAX_KEYS_PER_LEASE keys). A map of indefinite length (none of ours writes one) is taken alike, up to its
        break."""
        first = _read_exact(fp, 1)[0]
        left = None if first == 0xBF else _map_count(first, fp)  # None: of indefinite length
        if left is None and first != 0xBF:
            raise ValueError("a key/value snapshot of an unknown format (damaged leases)")
        while left is None or left:
            yield
            batch_most = RESTORE_BATCH_LEASES if self.ids.in_order else RESTORE_BATCH_LEASES // 2
            most = batch_most if left is None else min(left, batch_most)
            batch: list[int] = []
            keys = 0
            ended = False
            try:
                while len(batch) < most and keys < batch_most:
                    if left is None and (ended := _at_break(fp)):
                        break
                    lease_id = decode()
                    keys += self.add(lease_id, decode())
                    batch.append(lease_id)  # type: ignore[arg-type]  # add checked that it is an int
            except cbor2.CBORError as e:
                _damaged(e, "a lease does not decode")
            self.ids.extend(batch)
            if left is not None:
                left -= len(batch)
            elif ended:
                return


def _chunk_records(chunk: object) -> tuple[list[str], list[Record]]:
    """One of V4's chunks (`_write_chunks`), decoded in one cbor2 call and checked by C-level passes over its
    columns (no Python call per record: ~1 us a record, against ~3.3 for V3's pair by pair): its keys (text) and
    records, as V3's are (`_record`'s rules: [bytes, int >= 0, int >= 0], create <= modify)."""
    if type(chunk) is not bytes:
        raise ValueError("a damaged key/value snapshot (a chunk of records that is not a byte string)")
    fp = io.BytesIO(chunk)
    try:
        flat = _decoder(fp).decode()
    except cbor2.CBORError as e:
        _damaged(e, "a chunk of records does not decode")
    if type(flat) is not list or not flat or len(flat) % 4 or fp.tell() != len(chunk):
        raise ValueError("a damaged key/value snapshot (a chunk that is not [key, value, create, modify, ...])")
    keys, values, creates, modifies = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
    if not (_all_of(str, keys) and _all_of(bytes, values) and _all_of(int, creates) and _all_of(int, modifies)):
        raise ValueError("a damaged key/value snapshot (a key that is not text, or a record that is not "
                         "[value, create <= modify])")
    if min(creates) < 0 or not all(map(operator.le, creates, modifies)):
        raise ValueError("a damaged key/value snapshot (a record that is not [value, create <= modify])")
    # One int object for both indices when they are equal, as a create makes them (memory per key: `_record`).
    modifies = [c if c == m else m for c, m in zip(creates, modifies)]
    return keys, list(zip(values, creates, modifies))


def _all_of(kind: type, items: list) -> bool:
    """Whether every one of `items` is exactly of type `kind` (a bool is not an int here), in one C-level pass."""
    return set(map(type, items)) == {kind}


def _at_break(fp) -> bool:
    """Whether the next byte of `fp` is the break that ends an item of indefinite length (read if so, else left)."""
    peek = getattr(fp, "peek", None)  # a BufferedReader's; a BytesIO is read and set back
    head = peek(1)[:1] if peek is not None else fp.read(1)
    if not head:
        raise ValueError("a damaged key/value snapshot (it ends inside its leases)")
    if head == b"\xff":
        if peek is not None:
            fp.read(1)
        return True
    if peek is None:
        fp.seek(-1, io.SEEK_CUR)
    return False


def _records_of(v: object, with_indices: bool) -> KeyTable:
    """The records of a key/value map decoded whole (the formats restored in one step), checked."""
    if type(v) is not dict:
        raise ValueError("a key/value snapshot of an unknown format (not a map)")
    if not all(type(k) is str for k in v):
        raise ValueError("a damaged key/value snapshot (a key that is not text)")
    return KeyTable((k, _record(x, with_indices)) for k, x in v.items())


def _whole(data) -> bytes | bytearray | memoryview:
    """A snapshot's bytes, or a SnapshotSource's read whole (the formats restored in one step)."""
    return data if isinstance(data, (bytes, bytearray, memoryview)) else data.read(0, len(data))
