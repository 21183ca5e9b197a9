"""Locks and leader elections on a raftdzmq cluster, as etcd's `concurrency` package builds them: a lease, a
transaction that creates a key of one's own if absent, and a watch on the one key ahead (no thundering herd).

    with client.lock("locks/report", ttl=10) as token:
        storage.write(report, fencing_token=token)       # the storage refuses tokens older than one it has seen

Its rules:
- A contender's key is `NAME/<its lease id in hex>`, on its lease, created by a transaction (create if absent,
  read the prefix in the same entry). The keys under `NAME/` form a queue ordered by create index: the lowest
  holds the lock (or leads the election). A contender waits for the deletion of the key just ahead of its own
  (a long poll on that one key, from the index it read at, so no deletion is missed), then reads the queue again.
  The transaction is idempotent (the key is this lease's own), so one whose outcome is unknown is sent again.
- The fencing token is the holder's key's create index. It grows with every new holder: a later holder's key was
  created after (or while) every earlier holder held. **A lock without a fencing token is not safe** (Kleppmann,
  "How to do distributed locking", 2016): a holder paused (GC, a stopped VM, a slow disk) past its lease's TTL
  still believes it holds the lock when it resumes, while the lease expired and another process took the lock; its
  writes then interleave with the new holder's. No timeout on the holder's side can prevent this, because the
  pause can come between any check and the write. The resource must check the token: accept a write only with
  a token at least the highest it has seen (in raftdzmq itself: a txn comparing a stored token, as the tests do).
- Nothing waits without bound: a contender gives up at its `timeout` (LockTimeout, its key removed), and notices
  within a poll (`_POLL_SECONDS`) that its lease is gone (LockLost: its key was deleted with it) instead of
  waiting for a turn that will never come. A holder learns that its lease is gone from `Lock.lost` (set by the
  lease's keepalive): its token is then stale.
- Leaving the `with` block, or `release()` / `resign()`, revokes the lease: the key goes in the same entry, and
  the next contender's watch wakes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from raftlib.client import (Client, Compacted, KeyValue, Lease, OutcomeUnknown, RaftdzmqError, Value, get_op,
                            put_op)

T = TypeVar("T")
_POLL_SECONDS = 1.0  # the longest a contender waits before checking its own lease again
_UNKNOWN_RETRIES = 5  # how often an idempotent step whose outcome is unknown is sent again


class LockTimeout(RaftdzmqError):
    """The lock (or the election) was not won within its timeout; the contender's key was removed."""


class LockLost(RaftdzmqError):
    """The contender's lease expired (or was revoked) while it waited: its key is gone."""


class _Queue:
    """The contenders under `name + "/"`, ordered by create index (the module's rules)."""

    def __init__(self, client: Client, name: str, ttl: int) -> None:
        if not name:
            raise ValueError("a lock or election has a name")
        self.client, self.name, self.ttl = client, name, ttl
        self.prefix = name.rstrip("/") + "/"
        self.lease: Lease | None = None
        self.key: str | None = None
        self.create_index = 0

    def _again(self, build: Callable[[], T]) -> T:
        """`build()`, sent again when its outcome is unknown: every step here is idempotent, or (a lease's grant)
        leaves nothing behind that lasts (a lease granted twice expires unused)."""
        for attempt in range(_UNKNOWN_RETRIES):
            try:
                return build()
            except OutcomeUnknown:
                if attempt == _UNKNOWN_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _enqueue(self, value: Value) -> tuple[list[KeyValue], int]:
        """Grant the lease and create this contender's key (if absent: a retry finds it); the queue as of the
        transaction's index, and that index."""
        self.lease = self._again(lambda: self.client.lease(self.ttl))
        self.key = key = f"{self.prefix}{self.lease.id:x}"
        lease_id = self.lease.id
        result = self._again(lambda: self.client.txn().compare(key, "create_index", "==", 0)
                           .success(put_op(key, value, lease=lease_id), get_op(prefix=self.prefix))
                           .failure(get_op(prefix=self.prefix)).commit())
        return result.kvs(len(result.results) - 1), result.index

    def _read_queue(self) -> tuple[list[KeyValue], int]:
        result = self._again(lambda: self.client.txn().success(get_op(prefix=self.prefix)).commit())
        return result.kvs(0), result.index

    def _wait_turn(self, kvs: list[KeyValue], index: int, deadline: float | None) -> int:
        """Wait until this contender's key is the oldest under the prefix; its create index."""
        assert self.lease is not None
        while True:
            mine = next((kv for kv in kvs if kv.key == self.key), None)
            if mine is None or self.lease.lost.is_set():
                raise LockLost(f"{self.name}: the lease {self.lease.id} is gone, and the key with it")
            self.create_index = mine.create_index
            ahead = [kv for kv in kvs if kv.create_index < mine.create_index]
            if not ahead:
                return mine.create_index
            predecessor = max(ahead, key=lambda kv: kv.create_index)
            self._wait_deleted(predecessor.key, index, deadline)
            kvs, index = self._read_queue()

    def _wait_deleted(self, key: str, index: int, deadline: float | None) -> None:
        """Return once `key` was deleted (or expired) after `index`; LockTimeout at the deadline, LockLost when this
        contender's own lease is gone meanwhile."""
        assert self.lease is not None
        position = index
        while True:
            if self.lease.lost.is_set():
                raise LockLost(f"{self.name}: the lease {self.lease.id} is gone, and the key with it")
            wait = _POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise LockTimeout(f"{self.name}: not acquired in time")
            try:
                events, position = self.client.poll_events(key=key, from_index=position, timeout=wait)
            except Compacted:  # the node's history moved past the position: read the queue again
                return
            if any(e.type != "put" for e in events):
                return

    def _leave(self, quiet: bool = False) -> None:
        """Revoke the lease (the key goes with it). `quiet`: a failure to revoke is not raised (the lease then
        expires after its TTL), for when another error is on its way out."""
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                lease.revoke()
            except RaftdzmqError:
                lease.close()
                if not quiet:
                    raise


class Lock(_Queue):
    """`with client.lock(name, ttl) as token:` holds the lock in the block; `token` is the fencing token (the
    module's rules say why it must be used). `timeout`: the most to wait for it (LockTimeout), None: no bound but
    the lease's."""

    def __init__(self, client: Client, name: str, ttl: int = 10, timeout: float | None = None) -> None:
        super().__init__(client, name, ttl)
        self.timeout = timeout
        self.token: int | None = None

    def acquire(self) -> int:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        kvs, index = self._enqueue(b"")
        try:
            self.token = self._wait_turn(kvs, index, deadline)
        except BaseException:
            self._leave(quiet=True)
            raise
        return self.token

    @property
    def lost(self) -> bool:
        """True once this holder's lease is (or may be) gone: its token is stale."""
        return self.lease is None or self.lease.lost.is_set()

    def release(self) -> None:
        self.token = None
        self._leave()

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Election(_Queue):
    """A leader election under `name`: `campaign(value)` waits until this process leads (returning its fencing
    token), `leader()` is the current leader's key and value, `observe()` yields each new leader, `resign()`
    ends this process's candidacy or leadership."""

    def campaign(self, value: Value, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        kvs, index = self._enqueue(value)
        try:
            return self._wait_turn(kvs, index, deadline)
        except BaseException:
            self._leave(quiet=True)
            raise

    def proclaim(self, value: Value) -> None:
        """Change the value this leader announces (its key keeps its create index and lease)."""
        if self.lease is None or self.key is None:
            raise LockLost(f"{self.name}: not campaigning")
        key, lease_id = self.key, self.lease.id
        result = self._again(lambda: self.client.txn().compare(key, "create_index", "==", self.create_index)
                           .success(put_op(key, value, lease=lease_id)).commit())
        if not result.succeeded:
            raise LockLost(f"{self.name}: this candidate's key is gone")

    @property
    def lost(self) -> bool:
        return self.lease is None or self.lease.lost.is_set()

    def leader(self) -> KeyValue | None:
        """The leader's key (its value is what it campaigned with), None when nobody campaigns."""
        kvs, _ = self._read_queue()
        return min(kvs, key=lambda kv: kv.create_index, default=None)

    def observe(self) -> Iterator[KeyValue | None]:
        """The leader now, then each change of leader (or of its value), as the watch sees the queue change;
        None while nobody campaigns. An iterator without end: break out of it."""
        kvs, index = self._read_queue()
        queue = {kv.key: kv for kv in kvs}
        current = min(queue.values(), key=lambda kv: kv.create_index, default=None)
        yield current
        with self.client.watch(prefix=self.prefix, from_index=index) as watch:
            for event in watch:
                if event.type == "put":
                    queue[event.key] = KeyValue(event.key, event.value or b"", event.create_index, event.index)
                else:
                    queue.pop(event.key, None)
                new = min(queue.values(), key=lambda kv: kv.create_index, default=None)
                if new != current:
                    current = new
                    yield current

    def resign(self) -> None:
        self._leave()
