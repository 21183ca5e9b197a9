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
- The formats are part of the data dir (docs/DATA-DIR.md). A snapshot is `[SNAPSHOT_WITH_CLAIMS_V2, map, claims,
  horizon]` (AdminClaims' whole state after the map), the map of definite length with its keys in increasing
  order: the format of the previous release, which it reads as it always did (a rolling upgrade sends a new
  leader's snapshot to old followers), in an order it never relied on. A node restores it a batch of keys per
  turn of its event loop (`restoring`), not in one step that holds the loop for as long as the whole state takes
  to decode (~1 s at 1M keys): it parses the array's and the map's heads itself, then decodes RESTORE_BATCH_KEYS
  key/value pairs per step, then the claims and horizon, checked before anything is replaced. Keys out of order
  (the previous release wrote the map in insertion order) are not damage: they go into the index one by one
  (O(log n) each, still a bounded batch per step); a key twice, a count that differs from the pairs present,
  bytes after the end, a key not text or a value not bytes are (ValueError). Older formats still restore (a data
  dir from before must start): a plain CBOR map (incrementally too), `[SNAPSHOT_WITH_CLAIMS, map, claims]` (the
  version before the horizon was kept: a horizon of 0; in one step, as is a map of indefinite length, which no
  version wrote).
- `keys` holds the keys of `data` in order, kept in step by `apply` and `restore` only: a page of keys costs
  O(log n + page), never a sort of the whole key set (which holds the event loop for as long as it takes). A
  restore builds it from keys that come in increasing order without sorting, checking the order.
- A restore builds the new state aside and replaces the old one in one assignment at its end: a snapshot found
  bad (ValueError) part way changes nothing, and readers see the old state or the new, never a mix.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import cbor2
from sortedcontainers import SortedList

log = logging.getLogger("raftdzmq.store")

# The ops of a command. ADMIN_CLAIM is [ADMIN_CLAIM, signature, b"", [timestamp, now]]: a signed admin request about
# to take effect (AdminClaims).
SET, DELETE, COMPARE_AND_SET, CREATE, ADMIN_CLAIM = 0, 1, 2, 3, 4
SNAPSHOT_WITH_CLAIMS = "raftdzmq-kv-claims-v1"
SNAPSHOT_WITH_CLAIMS_V2 = "raftdzmq-kv-claims-v2"
# A restore decodes at most this many key/value pairs per step: ~1 us a pair (cbor2 6.3 from a buffered reader, the
# order checked, the dict filled), so ~2 ms a step at 1M keys of 100 bytes on this machine's cores (STACK-NOTES: a
# loop step should stay well under 10 ms); half as many once keys come out of order (~1.4 us more each).
RESTORE_BATCH_KEYS = 2048
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
        """The whole state as `[SNAPSHOT_WITH_CLAIMS_V2, map, claims, horizon]`, the map's keys in increasing order
        (the module's rules). Run by a forked child on its copy of the state (raftlib.runtime), so its time is not
        the event loop's: ~0.1 s per 200k keys, the map built in key order then encoded in one cbor2 call."""
        claims = self.admin_claims
        data = self.data
        in_order = {key: data[key] for key in self.keys}
        return cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, in_order, claims.claims, claims.horizon])

    def restore(self, data) -> None:
        """Replace the whole state with a snapshot's (empty bytes: the empty state): bytes, or a source with
        `len()` and `read(offset, length)` (raftlib.messages.SnapshotSource), in one go (start-up). Raises
        ValueError for a snapshot of an unknown format or a damaged one, changing nothing."""
        for _ in self.restoring(data):
            pass

    def restoring(self, data) -> Iterator[bool]:
        """`restore` a batch per step: a generator that decodes at most RESTORE_BATCH_KEYS keys each time it is
        advanced and yields False; once the state is replaced (the module's rules; not before), it yields True,
        then frees the old state a batch per step (freeing a million keys at once holds the loop too), yielding
        False, and ends. Dropping it before the True changes nothing. `[SNAPSHOT_WITH_CLAIMS, ...]` and a map of
        indefinite length (written by no version of raftdzmq) are decoded in one step."""
        old_data, old_keys = self.data, self.keys
        for _ in self._decode(data):
            yield False
        yield True
        # Only this generator holds the old state now (readers look up self.data afresh at each request).
        while old_data:
            for _ in range(2 * RESTORE_BATCH_KEYS):
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
        """The decoding half of `restoring`: the heads parsed here, then a batch of key/value pairs per step read
        by a cbor2 decoder from a buffered reader (it reads exactly each item's bytes, so the heads and the pairs
        can be read in turn); the claims and horizon after the map checked; the state replaced when it ends."""
        size = len(data)
        if not size:
            self._replace({}, SortedList(), AdminClaims())
            return
        fp = _buffered(data)
        decoder = cbor2.CBORDecoder(fp)
        first = _read_exact(fp, 1)[0]
        with_claims = first == 0x84  # an array of 4: [SNAPSHOT_WITH_CLAIMS_V2, map, claims, horizon]
        if with_claims:
            if _decode_item(decoder, "its format's name") != SNAPSHOT_WITH_CLAIMS_V2:
                raise ValueError("a key/value snapshot of an unknown format (from a newer raftdzmq?)")
            first = _read_exact(fp, 1)[0]
        count = _map_count(first, fp)
        if count is None:  # not a map of definite length: the older formats, a map of indefinite length, junk
            self._restore_whole(data if isinstance(data, (bytes, bytearray, memoryview)) else data.read(0, size))
            return
        new: dict[str, bytes] = {}
        in_order: _SortedKeys | None = _SortedKeys()  # while the keys come in increasing order (this version's)
        unordered: SortedList | None = None  # else (the previous release wrote the map in insertion order)
        decode = decoder.decode
        left = count
        while left:
            yield
            # Keys out of order cost ~1.4 us more each (SortedList.add): half a batch then.
            batch = min(left, RESTORE_BATCH_KEYS if unordered is None else RESTORE_BATCH_KEYS // 2)
            left -= batch
            # Two lists, not a tuple per pair: tuples are objects the cyclic collector tracks, and a million of
            # them made its collections long pauses of their own.
            batch_keys: list = []
            batch_values: list = []
            try:
                for _ in range(batch):
                    batch_keys.append(decode())
                    batch_values.append(decode())
            except cbor2.CBORError as e:  # an I/O error of the source goes up as it is
                raise ValueError(f"a damaged key/value snapshot (a key or value does not decode: {e})") from None
            if not all(type(k) is str for k in batch_keys) or not all(type(v) is bytes for v in batch_values):
                raise ValueError("a damaged key/value snapshot (a key that is not text or a value not bytes)")
            new.update(zip(batch_keys, batch_values))
            if len(new) != count - left:
                raise ValueError("a damaged key/value snapshot (a key twice)")
            if in_order is not None:
                taken = in_order.extend(batch_keys)
                if taken < batch:  # the rest, and every batch after, go in by insertion
                    unordered, in_order = in_order.sorted_list(), None
                    batch_keys = batch_keys[taken:]
            if unordered is not None:
                for key in batch_keys:  # O(log n) each: ~1.4 us, so a batch stays within the step's budget
                    unordered.add(key)
        claims, horizon = {}, 0.0
        if with_claims:
            claims = _decode_item(decoder, "its admin claims")
            horizon = _decode_item(decoder, "its admin claims' horizon")
        if fp.read(1):
            raise ValueError("a damaged key/value snapshot (bytes after its end)")
        admin_claims = _admin_claims(claims, horizon)  # checked before anything is replaced
        keys = in_order.sorted_list() if in_order is not None else unordered
        self._replace(new, keys, admin_claims)

    def _restore_whole(self, data: bytes) -> None:
        """The formats decoded in one step (the module's rules)."""
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
        if not all(type(k) is str and type(x) is bytes for k, x in v.items()):
            raise ValueError("a damaged key/value snapshot (a key that is not text or a value not bytes)")
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


def _buffered(data) -> io.BufferedIOBase:
    """A snapshot's bytes, or a SnapshotSource (`len()`, `read(offset, length)`), as a buffered reader."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    return io.BufferedReader(_SourceReader(data), 1 << 16)


class _SourceReader(io.RawIOBase):
    """A SnapshotSource read from its start (its errors, e.g. SnapshotUnreadable, go up as they are)."""

    def __init__(self, source) -> None:
        super().__init__()
        self.source, self.offset, self.size = source, 0, len(source)

    def readable(self) -> bool:
        return True

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
        raise ValueError(f"a damaged key/value snapshot ({what} does not decode: {e})") from None


def _map_count(first: int, fp) -> int | None:
    """The number of pairs of a CBOR map of definite length whose initial byte is `first` (RFC 8949 3.1: major type
    5, the count in the additional information or the 1, 2, 4 or 8 bytes after it), read from `fp`; None when
    `first` is not the head of such a map."""
    if first >> 5 != 5:
        return None
    info = first & 31
    if info < 24:
        return info
    if info > 27:  # 31: a map of indefinite length; 28-30: reserved
        return None
    return int.from_bytes(_read_exact(fp, 1 << (info - 24)), "big")


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

    def extend(self, keys: list[str]) -> int:
        """Append the longest prefix of `keys` that keeps them strictly increasing (or the layout, and `page`,
        would be wrong); returns its length."""
        last = self.last
        taken = 0
        for key in keys:
            if last is not None and not key > last:
                keys = keys[:taken]
                break
            last = key
            taken += 1
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
        return taken

    def sorted_list(self) -> SortedList:
        if not self.laid_out:
            return SortedList(k for sub in self.keys_lists for k in sub)
        out = SortedList()
        out._lists = self.keys_lists
        out._maxes = [sub[-1] for sub in self.keys_lists]
        out._len = self.count
        out._index = []
        return out
