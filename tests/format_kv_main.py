# ruff: noqa
"""FROZEN: raftlib/server/store.py as of commit 9528a96 (unchanged on main up to 637af74), the previous release's
key/value store: what an old node of a rolling upgrade runs. Only the store tests import it, to check that a
snapshot today's code writes restores on it to the same state (an old follower given a new leader's snapshot), and
that today's code restores every snapshot it wrote. Do not edit (the original module docstring follows as
_ORIGINAL_DOCSTRING; only `from __future__ import annotations` was moved above it).
"""

from __future__ import annotations

_ORIGINAL_DOCSTRING = """The key/value state machine every node applies the committed log to: keys (str) to values (bytes), and the
replicated memory of signed admin requests (AdminClaims).

Rules:
- Pure and deterministic: no gevent, Bottle, zmq, socket, clock or randomness. The same commands in the same order
  give the same state and the same results on every node (raftlib.interfaces.StateMachine), and a snapshot
  restored gives back exactly the state it was taken of.
- A command is a CBOR array `[op, key, value, expected]` (`command` builds one). Results: "ok"; "missing" (a DELETE
  of a key that is not there); "failed" (a COMPARE_AND_SET whose expected value differs, a CREATE of a key that
  exists); "used" (an ADMIN_CLAIM of a signature claimed before); "expired" (an ADMIN_CLAIM older than the claims'
  horizon); "error" (a command that does not decode, applied
  as nothing). An unknown op (a newer version's command) applies as nothing and gives "ok".
- The formats are part of the data dir (docs/DATA-DIR.md): a snapshot is the map as a CBOR map, or, once any
  admin request was claimed, `[SNAPSHOT_WITH_CLAIMS_V2, map, claims, horizon]`, so a snapshot of a cluster that
  never signed an admin request stays readable by nodes from before claims; `[SNAPSHOT_WITH_CLAIMS, map, claims]`
  (the previous version's) is still read, with a horizon of 0.
- `keys` holds the keys of `data` in order, kept in step by `apply` and `restore` only: a page of keys costs
  O(log n + page), never a sort of the whole key set (which holds the event loop for as long as it takes).
"""


import logging

import cbor2
from sortedcontainers import SortedList

log = logging.getLogger("raftdzmq.store")

# The ops of a command. ADMIN_CLAIM is [ADMIN_CLAIM, signature, b"", [timestamp, now]]: a signed admin request about
# to take effect (AdminClaims).
SET, DELETE, COMPARE_AND_SET, CREATE, ADMIN_CLAIM = 0, 1, 2, 3, 4
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


class KeyValueStore:
    """The replicated state (see the module's rules); a raftlib.interfaces.StateMachine. Only new and deleted keys
    touch `keys`: an overwrite costs one dict lookup more than a plain dict would."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.keys = SortedList()
        self.admin_claims = AdminClaims()

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def __len__(self) -> int:
        return len(self.data)

    def apply(self, index: int, command: bytes) -> str:
        try:
            op, key, value, expected = cbor2.loads(command)
        except Exception:
            log.error("skipping an undecodable command at index %d", index)
            return "error"
        data = self.data
        if op == ADMIN_CLAIM:
            return self.admin_claims.apply(key, expected)
        if op == DELETE:
            if data.pop(key, None) is None:
                return "missing"
            self.keys.remove(key)
            return "ok"
        if op == COMPARE_AND_SET:
            if data.get(key) != expected:
                return "failed"
        elif op == CREATE:
            if key in data:
                return "failed"
        elif op != SET:
            return "ok"  # an unknown op (a newer version's command): applied as nothing
        if key not in data:
            self.keys.add(key)
        data[key] = value
        return "ok"

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
        claims = self.admin_claims
        if claims.claims or claims.horizon:
            return cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, self.data, claims.claims, claims.horizon])
        return cbor2.dumps(self.data)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's (empty bytes: the empty state). Raises ValueError for a
        snapshot of an unknown format, changing nothing."""
        v = cbor2.loads(data) if data else {}
        claims, horizon = {}, 0.0
        if type(v) is list:
            if len(v) == 4 and v[0] == SNAPSHOT_WITH_CLAIMS_V2 and type(v[3]) in (int, float):
                _, v, claims, horizon = v
            elif len(v) == 3 and v[0] == SNAPSHOT_WITH_CLAIMS:  # before the horizon was kept: it starts at 0
                _, v, claims = v
            else:
                raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
        if type(v) is not dict or type(claims) is not dict:
            raise ValueError("a key/value snapshot of an unknown format (not a map)")
        self.data = v
        self.keys = SortedList(self.data)
        self.admin_claims = AdminClaims(claims, float(horizon))
