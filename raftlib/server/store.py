"""The key/value state machine every node applies the committed log to: keys (str) to values (bytes), and the
replicated memory of signed admin requests (AdminClaims).

Rules:
- Pure and deterministic: no gevent, Bottle, zmq, socket, clock or randomness. The same commands in the same order
  give the same state and the same results on every node (raftlib.interfaces.StateMachine), and a snapshot
  restored gives back exactly the state it was taken of.
- A command is a CBOR array `[op, key, value, expected]` (`command` builds one). Results: "ok"; "missing" (a DELETE
  of a key that is not there); "failed" (a COMPARE_AND_SET whose expected value differs, a CREATE of a key that
  exists); "used" (an ADMIN_CLAIM of a signature claimed before); "error" (a command that does not decode, applied
  as nothing). An unknown op (a newer version's command) applies as nothing and gives "ok".
- The formats are part of the data dir (docs/DATA-DIR.md): a snapshot is the map as a CBOR map, or, while admin
  claims are within their window, `[SNAPSHOT_WITH_CLAIMS, map, claims]`, so a snapshot without claims stays
  readable by nodes from before claims.
- `keys` holds the keys of `data` in order, kept in step by `apply` and `restore` only: a page of keys costs
  O(log n + page), never a sort of the whole key set (which holds the event loop for as long as it takes).
"""

from __future__ import annotations

import logging

import cbor2
from sortedcontainers import SortedList

log = logging.getLogger("raftdzmq.store")

# The ops of a command. ADMIN_CLAIM is [ADMIN_CLAIM, signature, b"", [timestamp, now]]: a signed admin request about
# to take effect (AdminClaims).
SET, DELETE, COMPARE_AND_SET, CREATE, ADMIN_CLAIM = 0, 1, 2, 3, 4
SNAPSHOT_WITH_CLAIMS = "raftdzmq-kv-claims-v1"
# The clock skew allowed between the signer of an admin request and the leader that checks it (admin.AdminGuard).
# Part of the replicated state's rules: AdminClaims forgets a claim 2 x this after its timestamp.
ADMIN_CLOCK_SKEW_SECONDS = 300.0


def command(op: int, key: str, value: bytes = b"", expected: object = None) -> bytes:
    """The command that `KeyValueStore.apply` carries out (see the module's rules)."""
    return cbor2.dumps([op, key, value, expected])


class AdminClaims:
    """The replicated memory of signed admin requests that took effect, so that each takes effect at most once in
    the whole cluster: a leader proposes an ADMIN_CLAIM (the signature, its timestamp and the leader's clock) before
    acting, and acts only if the claim applied as "ok"; a claim of a signature already in the log applies as
    "used". Every node applies the same claims in log order, so a leader elected later (or after a restart, or a
    snapshot) refuses what an earlier one took.

    Rules: deterministic (no clock of its own: `now` comes in the command). A claim is forgotten once its timestamp
    is 2 x ADMIN_CLOCK_SKEW_SECONDS behind the newest `now` seen: every leader whose clock is within the allowed
    skew of that one refuses its timestamp anyway. Memory: one entry per admin request of that window."""

    def __init__(self, claims: dict[str, float] | None = None) -> None:
        self.claims: dict[str, float] = dict(claims or {})  # signature -> its timestamp
        self._newest_now = max(self.claims.values(), default=0.0)

    def apply(self, signature: object, when: object) -> str:
        """`when`: [the request's timestamp, the proposing leader's clock], Unix seconds."""
        if type(signature) is not str or type(when) is not list or len(when) != 2 or not all(
                type(t) in (int, float) for t in when):
            return "error"  # not written by this version: nothing to claim
        timestamp, now = when
        if now > self._newest_now + 60:  # forget in steps, not a scan of every claim at every claim
            self._newest_now = now
            horizon = now - 2 * ADMIN_CLOCK_SKEW_SECONDS
            self.claims = {s: t for s, t in self.claims.items() if t >= horizon}
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
        if self.admin_claims.claims:
            return cbor2.dumps([SNAPSHOT_WITH_CLAIMS, self.data, self.admin_claims.claims])
        return cbor2.dumps(self.data)

    def restore(self, data) -> None:
        """Replace the whole state with a snapshot's (empty bytes: the empty state): bytes, or a source with
        `len()` and `read(offset, length)` (raftlib.messages.SnapshotSource). Raises ValueError for a snapshot of
        an unknown format, changing nothing."""
        if not isinstance(data, (bytes, bytearray)):
            data = data.read(0, len(data))
        v = cbor2.loads(data) if data else {}
        claims = {}
        if type(v) is list:
            if len(v) != 3 or v[0] != SNAPSHOT_WITH_CLAIMS:
                raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
            _, v, claims = v
        if type(v) is not dict:
            raise ValueError("a key/value snapshot of an unknown format (not a map)")
        self.data = v
        self.keys = SortedList(self.data)
        self.admin_claims = AdminClaims(claims)
