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
  called when the level crosses to 2 so that the node takes a snapshot at once (raftlib.runtime's
  request_snapshot): an older binary started on the data dir then stops at start on the V3 snapshot ("unknown
  format") rather than replay the new ops as nothing. A downgrade below the cluster's level is not supported.
- Indices: a key's create index is the index of the entry that created it (after a delete, the next put creates
  it again), its modify index that of the entry that last wrote it. A node that restored a snapshot of the old
  format (level 1, written without indices) knows them as 0, so the indices exposed (`record`, events, compares,
  the V3 snapshot) are max(index, level_index), and 0 below level 2: the same on every node. The raise brings
  every stored index up to level_index once (an O(keys) pass at that one entry), so from then on the records are
  stored as exposed and the V3 snapshot dumps `data` as it is. A txn's compares see the state before the
  txn; its ops apply in order, each seeing the ones before it (as etcd's).
- Events (`on_event`, for watches): one Event per key changed, in a fixed order: a prefix delete's in key
  order, a txn's in op order (a prefix delete inside it in key order), a revoked lease's keys ("delete") and an
  expired lease's ("expire") in key order, lease after lease in the order the entry names them, all with the
  entry's index. None for a delete of a missing key, a failed condition, a restore. They are handed over once the whole command applied,
  and an on_event that raises is logged and does not stop the others: the replicated state never depends on a
  watcher (a txn is never left half applied).
- Leases (etcd v3's model): `leases` maps a lease id (the index of the entry that granted it: unique for the
  cluster's life, the same on every node) to its Lease (TTL in whole seconds and its keys); `lease_of` maps a
  key to its lease. A put with a lease attaches the key (a missing lease: NoLease, nothing applied); a put
  without one detaches it; a deleted key leaves its lease. A revoked or expired lease deletes its keys. The state
  machine never reads a clock: when a lease expires is the leader's decision (raftlib.server.leases), which
  reaches every node as a LEASE_EXPIRE entry; an id already gone is skipped. `on_lease(lease_id, ttl_seconds)`
  is called as a grant applies, `on_lease(lease_id, None)` as a lease goes (for the leader's LeaseKeeper).
- The formats are part of the data dir (docs/DATA-DIR.md). Below level 2 a snapshot is written as the previous
  releases read it: the map key -> value as a CBOR map, or, once any admin request was claimed,
  `[SNAPSHOT_WITH_CLAIMS_V2, map, claims, horizon]` (`[SNAPSHOT_WITH_CLAIMS, map, claims]`, older still, is read
  with a horizon of 0); indices are dropped and restore as 0. From level 2 on:
  `[SNAPSHOT_V3, map key -> [value, create_index, modify_index], claims, horizon, feature_level, level_index]`,
  the indices as exposed, then a seventh element, the leases: a map lease id -> [ttl_seconds, [keys in order]]
  (ids in order). A later level appends to it under a new tag or length that this release refuses (ValueError)
  rather than drop what it does not know. `encode_state` and `decode_state` are
  the only code that knows these formats.
- `keys` holds the keys of `data` in order, kept in step by `apply` and `restore` only: a page of keys costs
  O(log n + page), never a sort of the whole key set (which holds the event loop for as long as it takes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple, TypeGuard

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
# The feature level of this release: 1 is every release before issue 14.
FEATURE_LEVEL = 2
SNAPSHOT_V3 = "raftdzmq-kv-v3"
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
        put: set[str] = set()
        for i, o in enumerate(part):
            if (problem := _op_problem(o)) is not None:
                return f"{name}[{i}]: {problem}"
            if o[0] == "put":
                if o[1] in put:  # etcd refuses it too ("duplicate key given in txn request")
                    return f"{name}[{i}]: key {o[1]!r} is put twice in one branch"
                put.add(o[1])
    return None


def _holds(current: object, op: str, operand: object) -> bool:
    if op == "==":
        return current == operand
    if op == "!=":
        return current != operand
    if op == "<":
        return current < operand  # type: ignore[operator]
    return current > operand  # type: ignore[operator]


class KeyValueStore:
    """The replicated state (see the module's rules); a raftlib.interfaces.StateMachine. `data` maps a key to its
    record (value, create_index, modify_index), indices as applied (`record` gives them as exposed); a create
    keeps one int object for both. Only new and deleted keys touch `keys`. `leases` maps a lease id to its Lease,
    `lease_of` a key to its lease id (a key not in it has lease 0). `on_event` is called with each Event,
    `on_lease` as the module's rules say."""

    def __init__(self, on_event: Callable[[Event], None] | None = None,
                 on_level_raised: Callable[[int], None] | None = None,
                 on_lease: Callable[[int, int | None], None] | None = None) -> None:
        self.data: dict[str, tuple[bytes, int, int]] = {}
        self.keys = SortedList()
        self.admin_claims = AdminClaims()
        self.lease_of: dict[str, int] = {}
        self.leases: dict[int, Lease] = {}
        self.lease_ids = SortedList()  # the ids of `leases`, in step: GET /lease?after= bisects it (review, R6)
        self.feature_level = 1
        self.level_index = 0
        self.on_event = on_event
        self.on_lease = on_lease
        self.on_level_raised = on_level_raised  # called with the level when it crosses to 2 (a snapshot is due)
        self._events: list[Event] = []  # the command's, handed to on_event once it applied whole

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
        return len(self.data)

    def apply(self, index: int, command: bytes) -> object:
        result = self._apply(index, command)
        if self._events:
            events, self._events = self._events, []
            for event in events:
                try:
                    self.on_event(event)  # type: ignore[misc]  # events are only collected with an on_event
                except Exception:
                    log.exception("on_event failed on a %s of %r at index %d (the state is applied whole)",
                                  event.type, event.key, index)
        return result

    def _apply(self, index: int, command: bytes) -> object:
        try:
            op, key, value, expected = cbor2.loads(command)
        except Exception:
            log.error("skipping an undecodable command at index %d", index)
            return "error"
        if type(key) is not str:
            return "error"  # not written by this version (a list would not even hash)
        if op == SET or op == COMPARE_AND_SET or op == CREATE:
            record = self.data.get(key)
            if op == COMPARE_AND_SET:
                if (None if record is None else record[0]) != expected:
                    return "failed"
            elif op == CREATE and record is not None:
                return "failed"
            self._put(index, key, value, record)
            return "ok"
        if op == DELETE:
            return "ok" if self._delete(index, key) else "missing"
        if op == ADMIN_CLAIM:
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
                self._put(index, key, value, self.data.get(key), index)
            return granted
        if op == SET_WITH_LEASE:
            if type(value) is not bytes or type(expected) is not int or expected < 0:
                return "error"
            refused = self._lease_refusal(key, expected)
            if refused is not None:
                return refused
            self._put(index, key, value, self.data.get(key), expected)
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
            self._put(index, key, value, record)  # type: ignore[arg-type]
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
            self.level_index = index
            # Every stored index is below `index` (written by an earlier entry, or 0 from an old-format snapshot):
            # bring them to the floor now, one int object for all, so records are stored as exposed from here on.
            self.data = {key: (record[0], index, index) for key, record in self.data.items()}
            if self.on_level_raised is not None:
                self.on_level_raised(level)
        return "ok"

    def _grant(self, index: int, ttl_seconds: int) -> str:
        if len(self.leases) >= MAX_LEASES:
            return "full"
        assert index not in self.leases, "a lease id is the index of its grant: used once"
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

    def _put(self, index: int, key: str, value: bytes, record: tuple[bytes, int, int] | None,
             lease_id: int = 0) -> None:
        if self.lease_of or lease_id:  # no dict lookup on the write path of a store without leases
            self._link(key, lease_id)
        if record is None:
            self.keys.add(key)
            self.data[key] = (value, index, index)
            create_index = index
        else:
            create_index = record[1]
            self.data[key] = (value, create_index, index)
        if self.on_event is not None:
            self._events.append(Event("put", key, value, index, self.exposed(create_index)))

    def _delete(self, index: int, key: str, kind: str = "delete") -> bool:
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
        for o in ops:
            if len(o) == 4 and (refused := self._lease_refusal(o[1], o[3])) is not None:
                return refused
        if any(len(o) == 4 and o[3] for o in ops) and not self._fits(ops):
            return "lease full"
        results: list[tuple] = []
        delete_budget, get_keys_budget, get_bytes_budget = MAX_DELETE_KEYS_PER_ENTRY, MAX_TXN_GET_KEYS, MAX_TXN_GET_BYTES
        for kind, key, third, *lease in ops:
            if kind == "put":
                self._put(index, key, third, self.data.get(key), lease[0] if lease else 0)
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

    def _fits(self, ops: list) -> bool:
        """Whether the txn's puts with a lease leave every lease within MAX_KEYS_PER_LEASE keys (an upper bound:
        a later op of the txn may take a key off again)."""
        added: dict[int, set[str]] = {}
        for o in ops:
            if len(o) == 4 and o[3] and o[1] not in self.leases[o[3]].keys:
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
        return encode_state(self)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's (empty bytes: the empty state). Raises ValueError for a
        snapshot of an unknown format or a damaged one, changing nothing."""
        state = decode_state(data)
        self.data = state.data
        self.keys = SortedList(self.data)
        self.admin_claims = AdminClaims(state.claims, state.horizon)
        self.leases = state.leases
        self.lease_ids = SortedList(state.leases)
        self.lease_of = {key: lease_id for lease_id, lease in state.leases.items() for key in lease.keys}
        self.feature_level, self.level_index = state.feature_level, state.level_index


class State(NamedTuple):
    """What a snapshot holds (decode_state)."""

    data: dict[str, tuple[bytes, int, int]]
    claims: dict[str, float]
    horizon: float
    feature_level: int
    level_index: int
    leases: dict[int, Lease]


def encode_state(kv: KeyValueStore) -> bytes:
    """The snapshot of `kv`, in the format its feature level calls for (the module's rules)."""
    claims = kv.admin_claims
    if kv.feature_level >= 2:
        # Stored as exposed since the raise (the module's rules): the tuples go out as CBOR arrays, unchanged.
        leases = {i: [lease.ttl_seconds, sorted(lease.keys)] for i, lease in sorted(kv.leases.items())}
        return cbor2.dumps([SNAPSHOT_V3, kv.data, claims.claims, claims.horizon, kv.feature_level, kv.level_index,
                            leases])
    values = {k: record[0] for k, record in kv.data.items()}
    if claims.claims or claims.horizon:
        return cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, values, claims.claims, claims.horizon])
    return cbor2.dumps(values)


def _is_index(x: object) -> bool:
    return type(x) is int and x >= 0


def decode_state(data: bytes) -> State:
    """The state a snapshot holds (empty bytes: the empty state). Raises ValueError for an unknown format or a
    damaged snapshot."""
    try:
        v = cbor2.loads(data) if data else {}
    except Exception as e:
        raise ValueError(f"a key/value snapshot that does not decode: {e}") from None
    claims, horizon, feature_level, level_index = {}, 0.0, 1, 0
    leases: dict[int, Lease] = {}
    if type(v) is list and len(v) == 7 and v[0] == SNAPSHOT_V3:
        _, records, claims, horizon, feature_level, level_index, lease_map = v
        if (type(records) is not dict or not _is_index(level_index) or type(feature_level) is not int
                or feature_level < 2):
            raise ValueError("a key/value snapshot of an unknown format (a damaged V3)")
        if feature_level > FEATURE_LEVEL:
            raise ValueError(f"a key/value snapshot of feature level {feature_level}, above this release's "
                             f"{FEATURE_LEVEL}: start a newer raftdzmq on this data dir")
        state: dict[str, tuple[bytes, int, int]] = {}
        for key, record in records.items():
            if (type(key) is not str or type(record) is not list or len(record) != 3 or type(record[0]) is not bytes
                    or not _is_index(record[1]) or not _is_index(record[2])):
                raise ValueError(f"a key/value snapshot of an unknown format (a damaged record of {key!r})")
            value, create_index, modify_index = record
            # One int object for both indices when they are equal, as a create makes them (memory per key).
            state[key] = (value, create_index, create_index if modify_index == create_index else modify_index)
        leases = _decode_leases(lease_map, state)
    else:
        if type(v) is list:
            if len(v) == 4 and v[0] == SNAPSHOT_WITH_CLAIMS_V2:
                _, v, claims, horizon = v
            elif len(v) == 3 and v[0] == SNAPSHOT_WITH_CLAIMS:  # before the horizon was kept: it starts at 0
                _, v, claims = v
            else:
                raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
        if type(v) is not dict:
            raise ValueError("a key/value snapshot of an unknown format (not a map)")
        # Written without indices (level 1): they restore as 0, below any level_index to come (the rules).
        state = {}
        for key, value in v.items():
            if type(key) is not str or type(value) is not bytes:
                raise ValueError(f"a key/value snapshot of an unknown format (a damaged entry {key!r})")
            state[key] = (value, 0, 0)
    if type(claims) is not dict or type(horizon) not in (int, float):
        raise ValueError("a key/value snapshot of an unknown format (damaged claims)")
    return State(state, claims, float(horizon), feature_level, level_index, leases)


def _decode_leases(lease_map: object, records: dict) -> dict[int, Lease]:
    """The V3 snapshot's seventh element: ids in order, each key of a lease a record of no other lease."""
    if type(lease_map) is not dict:
        raise ValueError("a key/value snapshot of an unknown format (damaged leases)")
    leases: dict[int, Lease] = {}
    seen: set[str] = set()
    for lease_id in sorted(i for i in lease_map if type(i) is int):
        ttl_keys = lease_map[lease_id]
        if (lease_id < 1 or type(ttl_keys) is not list or len(ttl_keys) != 2 or not valid_ttl(ttl_keys[0])
                or type(ttl_keys[1]) is not list or not all(type(k) is str and k in records for k in ttl_keys[1])
                or seen.intersection(ttl_keys[1]) or len(set(ttl_keys[1])) != len(ttl_keys[1])):
            raise ValueError(f"a key/value snapshot of an unknown format (a damaged lease {lease_id!r})")
        seen.update(ttl_keys[1])
        leases[lease_id] = Lease(ttl_keys[0], set(ttl_keys[1]))
    if len(leases) != len(lease_map):
        raise ValueError("a key/value snapshot of an unknown format (a lease id that is not an integer)")
    return leases
