"""The key/value state machine every node applies the committed log to: keys (str) to values (bytes), and the
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
- The formats are part of the data dir (docs/DATA-DIR.md). A snapshot is made of independent PIECES, so that a
  node restores it a piece per turn of its event loop (`restoring`) rather than in one step that holds the loop
  for as long as the whole state takes to decode (~1 s at 1M keys): a CBOR sequence (RFC 8742) of byte strings,
  each with a 4-byte length (`0x5a`, u32), each holding one CBOR item: first
  `[SNAPSHOT_PIECES, claims, horizon, count]` (AdminClaims' whole state, and the number of keys), then pieces
  `[key, value, key, value, ...]` of at most PIECE_KEYS keys and about PIECE_BYTES bytes, every key
  greater than the one before it, across pieces too. Older formats still restore (a data dir from before must
  start), in one step: the map as a CBOR map, `[SNAPSHOT_WITH_CLAIMS_V2, map, claims, horizon]`, or
  `[SNAPSHOT_WITH_CLAIMS, map, claims]` (the version before the horizon was kept: a horizon of 0).
- `keys` holds the keys of `data` in order, kept in step by `apply` and `restore` only: a page of keys costs
  O(log n + page), never a sort of the whole key set (which holds the event loop for as long as it takes). A
  restore from pieces builds it from the keys in the order they come, checked, without sorting.
- A restore builds the new state aside and replaces the old one in one assignment at its end: a snapshot found
  bad (ValueError) part way changes nothing, and readers see the old state or the new, never a mix.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

import cbor2
from sortedcontainers import SortedList

log = logging.getLogger("raftdzmq.store")

# The ops of a command. ADMIN_CLAIM is [ADMIN_CLAIM, signature, b"", [timestamp, now]]: a signed admin request about
# to take effect (AdminClaims).
SET, DELETE, COMPARE_AND_SET, CREATE, ADMIN_CLAIM = 0, 1, 2, 3, 4
SNAPSHOT_WITH_CLAIMS = "raftdzmq-kv-claims-v1"
SNAPSHOT_WITH_CLAIMS_V2 = "raftdzmq-kv-claims-v2"
SNAPSHOT_PIECES = "raftdzmq-kv-pieces-v1"  # its header: [SNAPSHOT_PIECES, claims, horizon, count]
# A piece: at most this many keys, and cut once its keys and values pass this many bytes. About 2 ms to decode
# on this machine's cores (STACK-NOTES: a loop step should stay well under 10 ms).
PIECE_KEYS = 2048
PIECE_BYTES = 128 << 10
_FRAME = struct.Struct(">BI")  # a CBOR byte string head with a 4-byte length: 0x5a, then the length
_BYTES_U32 = 0x5A
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
        """The whole state in the format of pieces (the module's rules). Run by a forked child on its copy of the
        state (raftlib.runtime), so its time is not the event loop's."""
        claims = self.admin_claims
        out = [_framed(cbor2.dumps([SNAPSHOT_PIECES, claims.claims, claims.horizon, len(self.data)]))]
        data = self.data
        piece: list = []
        size = 0
        for key in self.keys:
            value = data[key]
            piece.append(key)
            piece.append(value)
            size += len(key) + len(value)
            if len(piece) >= 2 * PIECE_KEYS or size >= PIECE_BYTES:
                out.append(_framed(cbor2.dumps(piece)))
                piece, size = [], 0
        if piece:
            out.append(_framed(cbor2.dumps(piece)))
        return b"".join(out)

    def restore(self, data) -> None:
        """Replace the whole state with a snapshot's (empty bytes: the empty state): bytes, or a source with
        `len()` and `read(offset, length)` (raftlib.messages.SnapshotSource), in one go (start-up). Raises
        ValueError for a snapshot of an unknown format or a damaged one, changing nothing."""
        for _ in self.restoring(data):
            pass

    def restoring(self, data) -> Iterator[bool]:
        """`restore` a piece per step: a generator that decodes one piece each time it is advanced and yields
        False; once the state is replaced (the module's rules; not before), it yields True, then frees the old
        state a piece per step (freeing a million keys at once holds the loop too), yielding False, and ends.
        Dropping it before the True changes nothing. A snapshot of an older format is decoded in one step."""
        old_data, old_keys = self.data, self.keys
        for _ in self._decode(data):
            yield False
        yield True
        # Only this generator holds the old state now (readers look up self.data afresh at each request).
        while old_data:
            for _ in range(4 * PIECE_KEYS):
                if not old_data:
                    break
                old_data.popitem()
            yield False
        del old_data
        lists = getattr(old_keys, "_lists", None)
        if type(lists) is list:
            while lists:
                del lists[-4:]  # sublists of SortedList's load (1000) keys
                yield False
        del old_keys

    def _decode(self, data) -> Iterator[None]:
        """The decoding half of `restoring`: a piece per step; the state replaced when it ends."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            size = len(data)
            read = data.read
        else:
            size = len(data)
            view = memoryview(data)

            def read(offset: int, length: int) -> bytes:
                return bytes(view[offset : offset + length])

        if size and read(0, 1)[0] != _BYTES_U32:
            self._restore_whole(read(0, size))
            return
        if not size:
            self._replace({}, SortedList(), AdminClaims())
            return
        header, offset = _read_item(read, 0, size)
        if type(header) is not list or len(header) != 4 or header[0] != SNAPSHOT_PIECES \
                or type(header[1]) is not dict or type(header[2]) not in (int, float) or type(header[3]) is not int:
            raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
        _, claims, horizon, count = header
        admin_claims = _admin_claims(claims, horizon)  # checked before any piece: a bad header changes nothing
        new: dict[str, bytes] = {}
        keys = _SortedKeys()
        while offset < size:
            yield
            piece, offset = _read_item(read, offset, size)
            if type(piece) is not list or not piece or len(piece) % 2:
                raise ValueError("a damaged key/value snapshot (a piece that is not [key, value, ...])")
            piece_keys = piece[0::2]
            piece_values = piece[1::2]
            if not all(type(k) is str for k in piece_keys) or not all(type(v) is bytes for v in piece_values):
                raise ValueError("a damaged key/value snapshot (a key that is not text or a value not bytes)")
            keys.extend(piece_keys)  # checks the order
            new.update(zip(piece_keys, piece_values))
        if len(new) != count:
            raise ValueError(f"a damaged key/value snapshot ({len(new)} keys, its header says {count})")
        self._replace(new, keys.sorted_list(), admin_claims)

    def _restore_whole(self, data: bytes) -> None:
        """The formats from before pieces: decoded in one step."""
        try:
            v = cbor2.loads(data)
        except Exception as e:
            raise ValueError(f"a damaged key/value snapshot: {e}") from None
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
        admin_claims = _admin_claims(claims, horizon)
        self._replace(v, SortedList(v), admin_claims)

    def _replace(self, data: dict[str, bytes], keys: SortedList, admin_claims: AdminClaims) -> None:
        """The one place the state is replaced: everything given was checked (a damaged snapshot raises before
        it gets here, so it changes nothing)."""
        assert len(keys) == len(data)
        self.data = data
        self.keys = keys
        self.admin_claims = admin_claims


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


def _framed(item: bytes) -> bytes:
    return _FRAME.pack(_BYTES_U32, len(item)) + item


def _read_item(read, offset: int, size: int) -> tuple[object, int]:
    """The CBOR item framed at `offset` (a byte string with a 4-byte length holding it), and where the next starts."""
    head = read(offset, _FRAME.size)
    if len(head) != _FRAME.size:
        raise ValueError(f"a damaged key/value snapshot (it ends inside a piece's head at {offset})")
    kind, length = _FRAME.unpack(head)
    end = offset + _FRAME.size + length
    if kind != _BYTES_U32 or end > size:
        raise ValueError(f"a damaged key/value snapshot (a bad piece at {offset})")
    try:
        return cbor2.loads(read(offset + _FRAME.size, length)), end
    except Exception as e:
        raise ValueError(f"a damaged key/value snapshot (a piece at {offset} does not decode: {e})") from None


class _SortedKeys:
    """A SortedList built from keys that come in increasing order, in O(n) with no sort: its sublists are laid
    out as SortedList lays them (`_lists` of at most its load, `_maxes` their last keys). Relies on
    sortedcontainers' layout (2.x, unchanged since 2016); a SortedList without it is built by sorting instead."""

    def __init__(self) -> None:
        self.keys_lists: list[list[str]] = []
        self.count = 0
        self.last: str | None = None
        probe = SortedList()
        self.load = getattr(probe, "_load", 0)
        self.laid_out = bool(self.load) and all(hasattr(probe, a) for a in ("_lists", "_maxes", "_len", "_index"))

    def extend(self, keys: list[str]) -> None:
        last = self.last
        for key in keys:  # strictly increasing, or the layout (and `page`) would be wrong
            if last is not None and not key > last:
                raise ValueError("a damaged key/value snapshot (keys out of order)")
            last = key
        self.last = last
        self.count += len(keys)
        load = self.load or 1000
        if self.keys_lists and len(self.keys_lists[-1]) < load:
            tail = self.keys_lists[-1]
            room = load - len(tail)
            tail.extend(keys[:room])
            keys = keys[room:]
        for i in range(0, len(keys), load):
            self.keys_lists.append(keys[i : i + load])

    def sorted_list(self) -> SortedList:
        if not self.laid_out:
            return SortedList(k for sub in self.keys_lists for k in sub)
        out = SortedList()
        out._lists = self.keys_lists
        out._maxes = [sub[-1] for sub in self.keys_lists]
        out._len = self.count
        out._index = []
        return out
