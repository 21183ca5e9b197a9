"""The Python client of a raftdzmq cluster (issue 15), on urllib3's pooled connections.

    from raftlib.client import Client
    c = Client(["localhost:8080", "localhost:8081", "localhost:8082"], timeout=10)
    c.put("cfg", b"v1"); c.get("cfg").value             # b"v1"
    with c.lock("jobs", ttl=10) as token: ...             # raftlib.concurrency: a lock with a fencing token

Its rules:
- Importable anywhere: it loads no gevent and no zmq and patches nothing. Under plain threads it is thread-safe (one
  Client may be shared); in a gevent program that monkey-patched, its sockets and its keepalive threads are
  gevent's, so it cooperates without knowing. Its only background work is a Lease's keepalive thread.
- Every call is bounded: `timeout` seconds in all, retries and failover included (a write's attempt gets what is
  left, a read's at most half the bound, so that a node that does not answer leaves time for the next); a watch's
  stream read waits at most `stream_timeout` (the server sends a keep-alive every 5 s).
- Finding the leader: writes and lease calls go to the leader it remembers, else to the endpoints in turn. A
  follower's `307` names the leader (remembered, even when it is not among the endpoints); a node that refuses the
  connection is passed over and the leader forgotten. Reads (`get`, `list`, `range`, `status`) are linearizable on
  every node: they go to the same node and fail over to the next on any failure.
- Retries, and never a silent retry of a write that may have applied. A write is sent again (after a short backoff,
  to the leader or the next endpoint) only when it surely took no effect: the connection was refused or never
  established (nothing was sent), or the answer says `X-Raft-Outcome: not-applied` (a redirect, no leader yet, a
  refusal before it got an index, a removed node). A write whose fate is not known raises `OutcomeUnknown`: no
  answer after it was sent (a timeout, a reset, the node died), or `X-Raft-Outcome: unknown`. Read the key and
  decide: the client cannot. Requests that change nothing if sent twice (reads, a lease keepalive, a revoke's
  retry is not one of them) are retried on any failure within the bound.
- Errors are typed: RaftdzmqError > NotFound, PreconditionFailed, OutcomeUnknown, Unavailable, Compacted,
  BadRequest, Conflict. Every one carries the server's one-line reason when there was one.
- Watches never skip nor repeat an event: events are handed out only when their index group is whole (the
  server's `id:` line closes a group), the position is the last whole group's index, and a reconnect (to the next
  endpoint, after a node died or ended the stream: it ends one when its watcher fell behind its history, and
  every one when it was removed or has heard from no leader for a while) resumes with `Last-Event-ID` at that
  position. A position no node has any more raises `Compacted(oldest_index)`: read the keys again and watch from
  the read's index. Another member may hold more history than the node that answered 410 (one restored from a
  snapshot, or one that fell behind): a watch, and a long poll, raise it only once every endpoint said so, or at
  the client's timeout when one did and none served it (the smallest oldest index they gave).
"""

from __future__ import annotations

import base64
import builtins
import collections
import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import urllib3
import urllib3.exceptions

if TYPE_CHECKING:  # only for the annotations: raftlib.concurrency imports this module
    from raftlib.concurrency import Election, Lock

OUTCOME_HEADER = "x-raft-outcome"
DEFAULT_PORT = 8080
_BACKOFF_SECONDS = (0.05, 0.1, 0.2, 0.3)  # once every node failed since the last wait, then 0.3 s each


# ---- errors -----------------------------------------------------------------------------------------------------


class RaftdzmqError(Exception):
    """Any failure of a call; `status` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(RaftdzmqError):
    """404: no such key (or lease)."""


class PreconditionFailed(RaftdzmqError):
    """412: a compare-and-set did not hold; `modify_index` is the key's current one (0: missing) when given."""

    def __init__(self, message: str, status: int | None = None, modify_index: int | None = None) -> None:
        super().__init__(message, status)
        self.modify_index = modify_index


class OutcomeUnknown(RaftdzmqError):
    """A write that may or may not have applied (it was sent and no answer came, or the server said `unknown`).
    Never retried by the client: read the state before deciding to send it again."""


class Unavailable(RaftdzmqError):
    """No node could serve the request within the timeout (no leader, every endpoint down, a full disk); a write
    that raised it surely did not apply."""


class Compacted(RaftdzmqError):
    """410 on a watch: its position is older than the history of every endpoint (module rules); `oldest_index` is
    the oldest they keep."""

    def __init__(self, message: str, oldest_index: int) -> None:
        super().__init__(message, 410)
        self.oldest_index = oldest_index


class BadRequest(RaftdzmqError):
    """400 (or another 4xx not named here): the request itself is wrong; sending it again would not help."""


class Conflict(RaftdzmqError):
    """409: the cluster refuses it in its state (feature level, too many leases or members)."""


# ---- values -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """A key as read: its value's bytes, the index of the entry that created it and of the one that last wrote it
    (0 below the cluster's feature level 2)."""
    key: str
    value: bytes
    create_index: int
    modify_index: int

    @property
    def text(self) -> str:
        return self.value.decode()


@dataclasses.dataclass(frozen=True)
class Event:
    """A watch event: `type` "put", "delete" or "expire"; `value` the bytes a put wrote (None otherwise); `index`
    the entry's index (events of one entry share it)."""
    type: str
    key: str
    value: bytes | None
    index: int
    create_index: int


@dataclasses.dataclass(frozen=True)
class Member:
    id: str
    raft_address: str
    http_address: str
    role: str
    match_index: int | None


@dataclasses.dataclass
class TxnResult:
    """A transaction's answer: which branch ran, its entry's index, and one result per op of that branch (a get's
    `kvs` as KeyValues, `more` when a bound of the server cut it short)."""
    succeeded: bool
    index: int
    results: list[dict[str, Any]]

    def kvs(self, op: int) -> list[KeyValue]:
        """The KeyValues of the get at position `op` of the branch that ran."""
        return self.results[op]["kvs"]


Value = bytes | str


def _bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _value_json(value: Value) -> dict[str, str]:
    """A value as the txn body carries it: text when it is UTF-8, else base64."""
    data = _bytes(value)
    try:
        return {"value": data.decode()}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(data).decode()}


def _value_of(item: dict[str, Any]) -> bytes | None:
    if "value_base64" in item:
        return base64.b64decode(item["value_base64"])
    return item["value"].encode() if "value" in item else None


def _kv_of(item: dict[str, Any]) -> KeyValue:
    return KeyValue(item["key"], _value_of(item) or b"", int(item["create_index"]), int(item["modify_index"]))


def _event_of(item: dict[str, Any]) -> Event:
    return Event(item["type"], item["key"], _value_of(item), int(item["index"]), int(item.get("create_index", 0)))


def normalize_endpoint(endpoint: str) -> str:
    """"host:port", "host" (port 8080) or "http://host:port/" as "host:port"; ValueError for anything else."""
    endpoint = endpoint.strip()
    if "://" in endpoint:
        endpoint = urllib.parse.urlsplit(endpoint).netloc
    endpoint = endpoint.rstrip("/")
    host, colon, port = endpoint.rpartition(":")
    if not colon:
        host, port = endpoint, str(DEFAULT_PORT)
    if not host or "/" in host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"an endpoint is host:port, not {endpoint!r}")
    return f"{host}:{int(port)}"


_DOT_SEGMENTS = {".": "%2E", "..": "%2E%2E"}


def key_path(key: str) -> str:
    """/db/KEY with the key percent-encoded (a `/` kept: it is a key's own character either way), a `.` or `..`
    segment too: urllib3 removes dot segments from a URL's path (RFC 3986 §5.2.4), so that put("a/../b") wrote the
    key "b" (review edge3, Q1); it keeps %2E, which the server decodes back to "."."""
    if not key:
        raise ValueError("a key is at least one character")
    return "/db/" + "/".join(_DOT_SEGMENTS.get(part, urllib.parse.quote(part, safe=""))
                             for part in key.split("/"))


# ---- transactions ----------------------------------------------------------------------------------------------


def put_op(key: str, value: Value, lease: int | None = None) -> dict[str, Any]:
    """A txn op that puts `value` at `key` (on `lease` when given)."""
    op: dict[str, Any] = {"op": "put", "key": key, **_value_json(value)}
    if lease is not None:
        op["lease"] = str(lease)
    return op


def get_op(key: str | None = None, prefix: str | None = None) -> dict[str, Any]:
    """A txn op that reads `key`, or every key under `prefix` (the server bounds it: `more` says it was cut)."""
    return {"op": "get", **_one_of(key, prefix)}


def delete_op(key: str | None = None, prefix: str | None = None) -> dict[str, Any]:
    return {"op": "delete", **_one_of(key, prefix)}


def _one_of(key: str | None, prefix: str | None) -> dict[str, str]:
    if (key is None) == (prefix is None):
        raise ValueError("give key or prefix, one of them")
    return {"key": key} if key is not None else {"prefix": prefix}  # type: ignore[dict-item]


_TARGETS = ("value", "create_index", "modify_index", "lease", "exists")
_OPS = ("==", "!=", "<", ">")


def compare(key: str, target: str, op: str, value: Value | int | bool) -> dict[str, Any]:
    """A txn compare: `target` one of value, create_index, modify_index, lease, exists; `op` ==, !=, <, >. A missing
    key compares as in etcd (indices and lease 0, any value compare false)."""
    if target not in _TARGETS or op not in _OPS:
        raise ValueError(f"a compare's target is one of {_TARGETS} and its op one of {_OPS}")
    if target == "value":
        return {"key": key, "target": target, "op": op, **_value_json(value)}  # type: ignore[arg-type]
    if target == "lease":
        return {"key": key, "target": target, "op": op, "value": str(value)}
    return {"key": key, "target": target, "op": op, "value": value}


class Txn:
    """A transaction being built: `client.txn().compare(...).success(...).failure(...).commit()`. The compares
    see the state before it; the chosen branch's ops apply in order, in one log entry."""

    def __init__(self, client: "Client") -> None:
        self._client = client
        self.compares: list[dict[str, Any]] = []
        self.on_success: list[dict[str, Any]] = []
        self.on_failure: list[dict[str, Any]] = []

    def compare(self, key: str, target: str, op: str, value: Value | int | bool) -> "Txn":
        self.compares.append(compare(key, target, op, value))
        return self

    def success(self, *ops: dict[str, Any]) -> "Txn":
        self.on_success.extend(ops)
        return self

    def failure(self, *ops: dict[str, Any]) -> "Txn":
        self.on_failure.extend(ops)
        return self

    def body(self) -> dict[str, Any]:
        return {"compare": self.compares, "success": self.on_success, "failure": self.on_failure}

    def commit(self) -> TxnResult:
        return self._client.txn_json(self.body())


# ---- the client -------------------------------------------------------------------------------------------------


class _Answer:
    """An answer: its status, body and headers (names in lower case); `raw`: the response still to be read, when
    the request asked for a stream and got a success."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str],
                 raw: urllib3.BaseHTTPResponse | None = None) -> None:
        self.status, self.body, self.headers, self.raw = status, body, headers, raw

    @property
    def reason(self) -> str:
        return self.body.decode(errors="replace").strip().splitlines()[0] if self.body.strip() else f"HTTP {self.status}"

    def json(self) -> Any:
        return json.loads(self.body)

    def header_int(self, name: str) -> int:
        return int(self.headers.get(name.lower(), "0") or 0)


class Client:
    """A client of the cluster at `endpoints` ("host:port", a list or a comma-separated string). `timeout`: the
    bound of each call in seconds, retries and failover included. `connect_timeout`: how long one connection
    attempt may take before the next endpoint is tried. Thread-safe; `close()` (or `with`) frees the pool."""

    def __init__(self, endpoints: Sequence[str] | str = ("localhost:8080",), timeout: float = 10.0,
                 connect_timeout: float = 1.0, stream_timeout: float = 15.0, pool_size: int = 8) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        self.endpoints = [normalize_endpoint(e) for e in endpoints if e.strip()]
        if not self.endpoints:
            raise ValueError("no endpoints")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts are positive")
        self.timeout, self.connect_timeout, self.stream_timeout = timeout, connect_timeout, stream_timeout
        self._pool = urllib3.PoolManager(num_pools=max(16, 2 * len(self.endpoints)), maxsize=pool_size, block=False,
                                         retries=False)
        self._lock = threading.Lock()
        self._leader: str | None = None  # the node believed to lead
        self._next = 0  # the endpoint to try next when no leader is known

    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- where requests go ----

    @property
    def leader(self) -> str | None:
        """The HTTP address of the node this client believes leads (None when it does not know)."""
        return self._leader

    def _candidates(self) -> Iterator[str]:
        """The nodes to try, in order, forever: the known leader first, then the endpoints from the next one."""
        while True:
            with self._lock:
                leader = self._leader
                start = self._next
            if leader is not None:
                yield leader
            for i in range(len(self.endpoints)):
                endpoint = self.endpoints[(start + i) % len(self.endpoints)]
                if endpoint != leader:
                    yield endpoint
                with self._lock:
                    if self._leader is not None and self._leader != leader:
                        break  # a redirect named a leader meanwhile: start over with it

    def _passed_over(self, node: str) -> None:
        """`node` failed: forget it as the leader and go on from the endpoint after it."""
        with self._lock:
            if self._leader == node:
                self._leader = None
            if node in self.endpoints:
                self._next = (self.endpoints.index(node) + 1) % len(self.endpoints)

    def _follow(self, location: str) -> str | None:
        node = urllib.parse.urlsplit(location).netloc or None
        if node:
            with self._lock:
                self._leader = node
        return node

    # ---- one call ----

    def request(self, method: str, path: str, body: bytes | None = None, *, idempotent: bool,
                headers: dict[str, str] | Callable[[str, float], dict[str, str]] | None = None,
                timeout: float | None = None, ok: Iterable[int] = (200,), stream: bool = False) -> _Answer:
        """Send a request to the cluster (module rules: leader first, failover, retries of what did not apply)
        and return the first answer whose status is in `ok`; raise the typed error of any other. `idempotent`:
        the request may be sent again after a failure that left its fate open (a read, a keepalive). `stream`:
        the successful answer's body is left to read from its `raw` (each read bounded by what was left of the
        timeout), and released by the caller. `headers` may be a function of (the node about to be asked, the
        seconds left): a request signed for one node (GET /snapshot with a secret) is signed anew for each; an
        Unavailable it raises passes that node over."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        # A read may go to the next node when one does not answer (a paused one): half the bound per attempt. A
        # write waits for its answer as long as the bound lets it (another attempt would not be allowed anyway).
        attempt_bound = budget / 2 if idempotent and timeout is None else budget
        ok = frozenset(ok)
        last_reason = "no endpoint answered"
        compacted = _CompactedAnswers(self.endpoints)
        failed: set[str] = set()  # nodes that failed since the last backoff
        backoffs = 0
        target = None
        for node in self._candidates():
            if target is not None:
                node = target  # a redirect's leader goes first
            target = None
            if node in failed:  # every way round once: wait a little (an election, a redirect to a dead leader)
                time.sleep(min(_BACKOFF_SECONDS[min(backoffs, len(_BACKOFF_SECONDS) - 1)],
                               max(0.0, deadline - time.monotonic())))
                backoffs += 1
                failed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise compacted.error() or Unavailable(f"{method} {path}: {last_reason} (gave up after {budget:g}s)")
            failed.add(node)
            try:
                node_headers = headers(node, min(remaining, attempt_bound)) if callable(headers) else headers
            except Unavailable as e:
                last_reason = str(e)
                self._passed_over(node)
                continue
            try:
                answer = self._send(node, method, path, body, node_headers, min(remaining, attempt_bound),
                                    ok if stream else ())
            except urllib3.exceptions.ConnectTimeoutError as e:  # nothing was sent: any request may go elsewhere
                last_reason = f"{node}: could not connect ({_short(e)})"
                self._passed_over(node)
                continue
            except (urllib3.exceptions.HTTPError, OSError) as e:  # sent, and no answer: its fate is open
                self._passed_over(node)
                if not idempotent:
                    raise OutcomeUnknown(f"{method} {path}: sent to {node}, no answer ({_short(e)}); "
                                         "it may have applied: read before retrying") from None
                last_reason = f"{node}: no answer ({_short(e)})"
                continue
            if answer.status in ok:
                if not idempotent and self._leader != node:
                    self._follow(f"http://{node}/")  # only a leader (or a -forward follower) carries out a write
                return answer
            outcome = answer.headers.get(OUTCOME_HEADER)
            if answer.status in (301, 302, 307, 308) and "location" in answer.headers:
                target = self._follow(answer.headers["location"])
                last_reason = f"{node}: redirected to {target}"
                continue
            if outcome == "unknown":
                raise OutcomeUnknown(f"{method} {path}: {answer.reason} (it may have applied: read before retrying)",
                                     answer.status)
            retryable = answer.status in (503, 410) and (idempotent or outcome == "not-applied")
            error = _error(answer, method, path)
            if not retryable:
                raise error
            if isinstance(error, Compacted) and compacted.add(node, error):
                raise compacted.error() or error  # every endpoint said so
            last_reason = f"{node}: {answer.status} {answer.reason}"
            self._passed_over(node)
        raise AssertionError("unreachable")  # _candidates never ends

    def _send(self, node: str, method: str, path: str, body: bytes | None, headers: dict[str, str] | None,
              remaining: float, stream_ok: Iterable[int] = ()) -> _Answer:
        """One attempt; an answer whose status is in `stream_ok` is returned unread (its `raw`)."""
        r = self._pool.request(method, f"http://{node}{path}", body=body, headers=headers, redirect=False,
                               retries=False, preload_content=not stream_ok,
                               timeout=urllib3.Timeout(connect=min(self.connect_timeout, remaining), read=remaining))
        names = {k.lower(): v for k, v in r.headers.items()}
        if r.status in stream_ok:
            return _Answer(r.status, b"", names, raw=r)
        if stream_ok:
            data = r.read()
            r.release_conn()
            return _Answer(r.status, data, names)
        return _Answer(r.status, r.data, names)

    def _open_stream(self, node: str, path: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        return self._pool.request("GET", f"http://{node}{path}", headers=headers, redirect=False, retries=False,
                                  preload_content=False,
                                  timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.stream_timeout))

    # ---- keys ----

    def get(self, key: str) -> KeyValue:
        """The key's value and indices (a linearizable read on any node); NotFound when missing."""
        a = self.request("GET", key_path(key), idempotent=True)
        return KeyValue(key, a.body, a.header_int("X-Raft-Create-Index"), a.header_int("X-Raft-Modify-Index"))

    def put(self, key: str, value: Value, *, prev_value: Value | None = None, prev_index: int | None = None,
            prev_exist: bool | None = None, lease: "int | Lease | None" = None) -> int:
        """Write `value` at `key` once it is committed on a majority; returns the entry's index. Conditions:
        `prev_value` (the current value must be it), `prev_index` (the key's modify index must be it; 0: missing),
        `prev_exist` (False: create only; True: only when it exists); `lease`: the key goes with the lease.
        PreconditionFailed when a condition does not hold."""
        data = _bytes(value)
        if prev_exist is True:
            if prev_value is not None or prev_index is not None or lease is not None:
                raise ValueError("prev_exist=True goes alone")
            result = self.txn().compare(key, "exists", "==", True).success(put_op(key, data)).commit()
            if not result.succeeded:
                raise PreconditionFailed(f"precondition failed: {key} does not exist", 412, 0)
            return result.index
        query: dict[str, str | bytes] = {}
        if prev_value is not None:
            query["prev_value"] = _bytes(prev_value)
        if prev_index is not None:
            query["prev_index"] = str(int(prev_index))
        if prev_exist is False:
            query["prev_exist"] = "false"
        if lease is not None:
            query["lease"] = str(lease.id if isinstance(lease, Lease) else int(lease))
        path = key_path(key) + (("?" + urllib.parse.urlencode(query)) if query else "")
        return self.request("POST", path, data, idempotent=False).header_int("X-Raft-Index")

    def delete(self, key: str, *, prev_index: int | None = None) -> int:
        """Delete `key`; returns the entry's index. NotFound when it was missing; with `prev_index`, only when its
        modify index is that (PreconditionFailed otherwise)."""
        path = key_path(key) + (f"?prev_index={int(prev_index)}" if prev_index is not None else "")
        return self.request("DELETE", path, idempotent=False).header_int("X-Raft-Index")

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` (in several atomic entries past 2,000 keys); returns how many."""
        path = "/db/?" + urllib.parse.urlencode({"prefix": prefix})
        answer = self.request("DELETE", path, idempotent=False).json()
        return int(answer["deleted"])

    def list(self, prefix: str = "", limit: int | None = None) -> list[str]:
        """The keys under `prefix`, sorted (every page of them, or the first `limit`). Each page is a linearizable
        read; the pages together are not one snapshot (range() is)."""
        keys: list[str] = []
        after = ""
        while limit is None or len(keys) < limit:
            page_size = 1000 if limit is None else min(1000, limit - len(keys))
            query = urllib.parse.urlencode({"prefix": prefix, "after": after, "limit": page_size})
            page = self.request("GET", f"/db/?{query}", idempotent=True).json()
            keys.extend(page["keys"])
            if page["next"] is None:
                break
            after = page["next"]
        return keys

    def range(self, prefix: str) -> builtins.list[KeyValue]:
        """The keys under `prefix` with values and indices, from one state (one transaction). The server returns
        at most 1,000 keys or 4 MiB; BadRequest when there are more (page with list() and get())."""
        result = self.txn().success(get_op(prefix=prefix)).commit()
        if result.results[0].get("more"):
            raise BadRequest(f"range {prefix!r}: more keys than one transaction returns; use list() and get()")
        return result.kvs(0)

    def txn(self) -> Txn:
        return Txn(self)

    def txn_json(self, body: dict[str, Any]) -> TxnResult:
        """POST /txn with `body` as the README gives it."""
        answer = self.request("POST", "/txn", json.dumps(body).encode(), idempotent=False,
                              headers={"Content-Type": "application/json"}).json()
        results = []
        for result in answer["results"]:
            if "kvs" in result:
                result = {**result, "kvs": [_kv_of(kv) for kv in result["kvs"]]}
            results.append(result)
        return TxnResult(bool(answer["succeeded"]), int(answer["index"]), results)

    # ---- watches ----

    def watch(self, key: str | None = None, prefix: str | None = None, from_index: int | None = None) -> "Watch":
        """An iterator of the changes to `key` (or under `prefix`) after `from_index` (default: from now), across
        nodes' deaths (module rules). Compacted when the position is older than a node's history."""
        return Watch(self, key, prefix, from_index)

    def poll_events(self, key: str | None = None, prefix: str | None = None, from_index: int = 0,
                    timeout: float = 5.0) -> tuple[builtins.list[Event], int]:
        """One long poll: the events after `from_index` as soon as there are some, else [] after `timeout`
        seconds; with the position to poll from next. Compacted when `from_index` is older than every endpoint's
        history (module rules); a node that answers 410 for it is passed over, as one that refuses watches."""
        query = urllib.parse.urlencode({**_one_of(key, prefix), "from": from_index, "poll": 1,
                                        "timeout": f"{max(0.0, min(timeout, 60.0)):.3f}"})
        answer = self.request("GET", f"/watch?{query}", idempotent=True, timeout=timeout + self.timeout)
        return [_event_of(e) for e in answer.json()], answer.header_int("X-Raft-Watch-Position")

    # ---- leases ----

    def grant(self, ttl: int) -> tuple[int, int]:
        """Grant a lease of `ttl` seconds with no keepalive: (its id, the TTL granted)."""
        answer = self.request("POST", f"/lease?ttl={int(ttl)}", idempotent=False).json()
        return int(answer["id"]), int(answer["ttl"])

    def lease(self, ttl: int, keepalive: bool = True) -> "Lease":
        """Grant a lease of `ttl` seconds kept alive in the background until revoked or closed (a context
        manager: leaving it revokes the lease)."""
        sent = time.monotonic()
        lease_id, granted = self.grant(ttl)
        return Lease(self, lease_id, granted, keepalive, granted_after=sent)

    def keepalive(self, lease_id: int) -> int:
        """One keepalive: the TTL it runs again from now; NotFound once the lease expired or was revoked."""
        return int(self.request("POST", f"/lease/{int(lease_id)}/keepalive", idempotent=True).json()["ttl"])

    def revoke(self, lease_id: int) -> int:
        """Revoke a lease and delete its keys: how many keys. NotFound when it was gone already."""
        return int(self.request("DELETE", f"/lease/{int(lease_id)}", idempotent=False).json()["deleted"])

    def lease_info(self, lease_id: int) -> dict[str, Any]:
        return self.request("GET", f"/lease/{int(lease_id)}", idempotent=True).json()

    def leases(self) -> builtins.list[dict[str, Any]]:
        """Every lease: {"id", "ttl", "remaining"}."""
        out: list[dict[str, Any]] = []
        after = ""
        while True:
            page = self.request("GET", f"/lease?limit=1000{after}", idempotent=True).json()
            out.extend(page["leases"])
            if page["next"] is None:
                return out
            after = f"&after={int(page['next'])}"

    # ---- backups ----

    def save_snapshot(self, path: str, timeout: float = 600.0, secret: bytes | None = None) -> tuple[int, str, int]:
        """Save the cluster's snapshot (GET /snapshot: the body, X-Raft-Snapshot-Index and X-Raft-Snapshot-Sha256)
        to `path` atomically: written to a temporary file beside it, its SHA-256 checked against the header,
        fsynced, renamed into place and the folder fsynced. A file is never left half written: on any failure
        the temporary file is removed and `path` is as it was. Returns (index, sha256 hex, bytes). `timeout`: the
        node writes the snapshot before it sends the first byte (large states take a while). `secret`: the
        cluster secret, when it has one: each node asked is asked its id (GET /status) and the request is signed
        for that node with a fresh nonce (raftlib.server.admin.node_request_headers; another node answers 421, a
        second use 403)."""
        headers = None if secret is None else self._node_signer(secret, "GET", "/snapshot")
        try:
            answer = self.request("GET", "/snapshot", idempotent=True, stream=True, timeout=timeout, headers=headers)
        except NotFound as e:
            raise RaftdzmqError(f"this cluster does not serve GET /snapshot (a raftdzmq without backups?): {e}",
                                404) from None
        assert answer.raw is not None
        digest = hashlib.sha256()
        size = 0
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    for chunk in answer.raw.stream(1 << 16):
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    raise Unavailable(f"GET /snapshot: the transfer broke after {size} bytes ({_short(e)})") from None
                f.flush()
                os.fsync(f.fileno())
            expected = answer.headers.get("x-raft-snapshot-sha256", "").lower()
            if not expected:
                raise RaftdzmqError("GET /snapshot: the answer has no X-Raft-Snapshot-Sha256 to check it against")
            if digest.hexdigest() != expected:
                raise RaftdzmqError(f"GET /snapshot: the body's SHA-256 {digest.hexdigest()} is not the header's "
                                    f"{expected} ({size} bytes received): not saved")
            os.replace(tmp, path)
        except BaseException:
            answer.raw.release_conn()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        answer.raw.release_conn()
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return answer.header_int("X-Raft-Snapshot-Index"), digest.hexdigest(), size

    # ---- the cluster ----

    def status(self, endpoint: str | None = None) -> dict[str, Any]:
        """GET /status of `endpoint` (no failover), or of the first node that answers."""
        if endpoint is not None:
            return self.ask(endpoint, "GET", "/status").json()
        return self.request("GET", "/status", idempotent=True).json()

    def members(self) -> builtins.list[Member]:
        return [Member(m["id"], m["raft_address"], m["http_address"], m["role"], m.get("match_index"))
                for m in self.request("GET", "/cluster", idempotent=True).json()]

    def remove_member(self, node_id: str, secret: bytes | None = None) -> None:
        """Remove a node; `secret`: the cluster secret, when it has one (the request is signed with it)."""
        self._admin("DELETE", f"/cluster/{urllib.parse.quote(node_id, safe='')}", secret)

    def transfer_leadership(self, node_id: str, secret: bytes | None = None) -> None:
        """Make `node_id` the leader; `secret`: the cluster secret, when it has one."""
        self._admin("POST", f"/cluster/transfer?to={urllib.parse.quote(node_id, safe='')}", secret)

    def _admin(self, method: str, target: str, secret: bytes | None) -> None:
        """An admin request (a write: its fate may be unknown), signed with `secret` when given. The signature
        is not bound to a node: a follower verifies it and redirects to the leader, which claims it (a second use
        is refused, 403). So each attempt is signed afresh (`_admin_signer`)."""
        headers = None if secret is None else self._admin_signer(secret, method, target)
        self.request(method, target, idempotent=False, headers=headers)

    @staticmethod
    def _admin_signer(secret: bytes, method: str, target: str) -> Callable[[str, float], dict[str, str]]:
        """request()'s per-attempt `headers` for an admin request: signed anew for each attempt (a new timestamp,
        which the signature covers: its nonce). A retry after a not-applied answer (a dropped transfer, an
        unconfirmed claim) sent with the first attempt's headers would be refused as a replay, since the leader
        claimed that signature before it dropped the request (review of rebind, F3)."""
        from raftlib.server.admin import admin_headers  # loads no gevent (its rules)

        return lambda node, remaining: admin_headers(secret, method, target)

    def _node_signer(self, secret: bytes, method: str, target: str) -> Callable[[str, float], dict[str, str]]:
        """The headers of `method target` signed for the node about to be asked (its id from its GET /status)
        with a fresh nonce: request()'s per-node `headers`."""
        from raftlib.server.admin import node_request_headers  # loads no gevent (its rules)

        def sign(node: str, remaining: float) -> dict[str, str]:
            answer = self.ask(node, "GET", "/status", timeout=max(0.001, min(remaining, self.timeout)))
            if answer.status != 200:
                raise Unavailable(f"{node}: GET /status answered {answer.status} {answer.reason}")
            node_id = answer.json().get("node_id")
            if not isinstance(node_id, str) or not node_id:
                raise Unavailable(f"{node}: GET /status names no node_id")
            return node_request_headers(secret, node_id, method, target)

        return sign

    def ask(self, endpoint: str, method: str, path: str, timeout: float | None = None) -> _Answer:
        """One request to one node, no failover and no retry: its answer whatever the status; Unavailable when
        it does not answer."""
        try:
            return self._send(normalize_endpoint(endpoint), method, path, None, None,
                              self.timeout if timeout is None else timeout)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise Unavailable(f"{endpoint}: {_short(e)}") from None

    # ---- recipes (raftlib.concurrency) ----

    def lock(self, name: str, ttl: int = 10, timeout: float | None = None) -> "Lock":
        """A distributed lock: `with client.lock("name", ttl) as token:` (raftlib.concurrency.Lock)."""
        from raftlib.concurrency import Lock
        return Lock(self, name, ttl, timeout)

    def election(self, name: str, ttl: int = 10) -> "Election":
        from raftlib.concurrency import Election
        return Election(self, name, ttl)


def _short(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    return str(reason).split(": ", 1)[-1][:200] or type(e).__name__


def _error(answer: _Answer, method: str, path: str) -> RaftdzmqError:
    """The typed error of a failed answer."""
    message = f"{method} {path}: {answer.status} {answer.reason}"
    status = answer.status
    if status == 404:
        return NotFound(message, status)
    if status == 412:
        modify = answer.headers.get("x-raft-modify-index")
        return PreconditionFailed(message, status, int(modify) if modify is not None else None)
    if status == 410 and "x-raft-oldest-index" in answer.headers:
        return Compacted(message, answer.header_int("X-Raft-Oldest-Index"))
    if status == 409:
        return Conflict(message, status)
    if 400 <= status < 500:
        return BadRequest(message, status)
    return Unavailable(message, status)


# ---- watch ----------------------------------------------------------------------------------------------------


class _CompactedAnswers:
    """The Compacted answers (410 with X-Raft-Oldest-Index) of one call's attempts, by node (module rules)."""

    def __init__(self, endpoints: Iterable[str]) -> None:
        self._endpoints = frozenset(endpoints)
        self._errors: dict[str, Compacted] = {}

    def add(self, node: str, error: Compacted) -> bool:
        """Count `node`'s answer; True once every endpoint has said so."""
        self._errors[node] = error
        return self._endpoints <= self._errors.keys()

    def error(self) -> Compacted | None:
        """The answer with the most history (the smallest oldest index), or None when no node said so."""
        return min(self._errors.values(), key=lambda e: e.oldest_index, default=None)


class Watch:
    """The iterator `Client.watch` returns (module rules: no event skipped or repeated, across reconnects).
    `position`: every change up to this index was handed out. `close()` ends it (from another thread too); it is
    a context manager. Without `from_index` the watch starts "from now" at the position the first node sends
    first; a stream that breaks before that (no event handed out yet) starts from a later now."""

    def __init__(self, client: Client, key: str | None, prefix: str | None, from_index: int | None) -> None:
        self._client = client
        self._names = _one_of(key, prefix)
        self.position: int | None = from_index
        self._ready: collections.deque[Event] = collections.deque()  # whole groups, to hand out
        self._response: urllib3.BaseHTTPResponse | None = None
        self._lines: Iterator[bytes] | None = None
        self._node: str | None = None  # the node the stream is open on
        self._closed = False
        self._ever_connected = False
        self._reading = False  # a thread is in _read_group
        self.reconnects = 0  # how many times the stream broke and was opened again

    def __iter__(self) -> "Watch":
        return self

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the watch. From another thread while one reads it, only the socket is shut down (its buffered
        reader is the reading thread's): the reader wakes up and lets the connection go itself."""
        self._closed = True
        response = self._response
        if response is not None and self._reading:
            try:
                response.shutdown()  # urllib3 2.3 and later; before, the reader wakes at the next keep-alive
            except Exception:
                pass
        elif response is not None:
            self._drop()

    def _drop(self) -> None:
        response, self._response, self._lines = self._response, None, None
        if response is not None:
            try:
                response.shutdown()
                response.close()  # the connection is not reused: the stream's rest is unread
                response.release_conn()
            except Exception:
                pass

    def __next__(self) -> Event:
        while not self._ready:
            if self._closed:
                self._drop()
                raise StopIteration
            self._reading = True
            try:
                self._read_group()
            finally:
                self._reading = False
        return self._ready.popleft()

    def _connect(self) -> None:
        """Open a stream at the position, on the next node that answers, within the client's timeout."""
        client = self._client
        deadline = time.monotonic() + client.timeout
        query = urllib.parse.urlencode(self._names)
        headers = {"Accept": "text/event-stream"}
        if self.position is not None:
            headers["Last-Event-ID"] = str(self.position)
        last_reason = "no endpoint answered"
        compacted = _CompactedAnswers(client.endpoints)
        attempt = 0
        for node in client._candidates():
            if self._closed:
                raise StopIteration
            if time.monotonic() >= deadline:
                raise compacted.error() or Unavailable(f"watch {query}: {last_reason} "
                                                       f"(gave up after {client.timeout:g}s)")
            attempt += 1
            try:
                response = client._open_stream(node, f"/watch?{query}", headers)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                client._passed_over(node)
                last_reason = f"{node}: {_short(e)}"
                continue
            if response.status == 200:
                self._response = response
                self._lines = _lines(response)
                self._node = node
                return
            answer = _Answer(response.status, response.read(), {k.lower(): v for k, v in response.headers.items()})
            response.release_conn()
            error = _error(answer, "GET", f"/watch?{query}")
            if isinstance(error, Compacted) and compacted.add(node, error):
                raise compacted.error() or error  # every endpoint said so
            if isinstance(error, BadRequest) and answer.status != 410:
                raise error
            # 503 (too many watches, stopping, no leader), a removed node's 410, a position older than this node's
            # history (another may hold it): the next one
            client._passed_over(node)
            last_reason = f"{node}: {answer.status} {answer.reason}"
            time.sleep(_BACKOFF_SECONDS[min(attempt, len(_BACKOFF_SECONDS)) - 1])

    def _read_group(self) -> None:
        """Read the stream until a group is whole (an `id:` line's message), reconnecting where it broke."""
        if self._lines is None:
            if self._ever_connected:
                self.reconnects += 1
            self._connect()
            self._ever_connected = True
        pending: list[Event] = []  # this group's events until its id arrives: dropped if the stream breaks
        fields: dict[str, str] = {}
        data: list[str] = []
        try:
            assert self._lines is not None
            for raw in self._lines:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line:
                    if line.startswith(":"):
                        continue
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    else:
                        fields[name] = value
                    continue
                # a blank line: dispatch the message
                kind = fields.get("event")
                if kind == "error":
                    # The node ended the stream: it fell behind its history, or the node stops serving watches
                    # (removed, or no leader for too long). Reconnect at the position, to another node first.
                    if self._node is not None:
                        self._client._passed_over(self._node)
                    break
                if data:
                    pending.append(_event_of(json.loads("\n".join(data))))
                if "id" in fields:
                    self.position = int(fields["id"])
                    self._ready.extend(pending)
                    return
                fields, data = {}, []
            # the stream ended or broke: what is pending comes again whole after the reconnect
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            pass
        except Exception:
            if not self._closed:  # close() from another thread pulls the response from under the reader
                raise
        self._drop()


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The response's lines as they arrive (read1 keeps a line from waiting for a full buffer)."""
    buffer = b""
    while True:
        chunk = response.read1(65536) if hasattr(response, "read1") else response.read(1)
        if not chunk:
            if buffer:
                yield buffer
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line + b"\n"


# ---- leases ---------------------------------------------------------------------------------------------------


class Lease:
    """A granted lease kept alive by a background thread (a greenlet in a monkey-patched gevent program) every
    third of its TTL. `lost` is set once it is surely gone (a keepalive answered 404), or may be (no keepalive
    succeeded for a TTL since the last one that did was sent): its keys are gone or going. `revoke()` (or leaving
    the `with` block) revokes it; `close()` only stops the keepalives. Both wait for the thread to end."""

    def __init__(self, client: Client, lease_id: int, ttl: int, keepalive: bool = True,
                 granted_after: float | None = None) -> None:
        """`granted_after`: a time.monotonic() from before the grant was sent (the lease surely lasts its TTL from
        then); default: now."""
        self.client, self.id, self.ttl = client, lease_id, ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._valid_until = (time.monotonic() if granted_after is None else granted_after) + ttl
        self._thread: threading.Thread | None = None
        if keepalive:
            self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{lease_id}", daemon=True)
            self._thread.start()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.revoke()

    def remaining(self) -> float:
        """Seconds the lease surely lasts by this process's clock (0 once lost)."""
        return 0.0 if self.lost.is_set() else max(0.0, self._valid_until - time.monotonic())

    def _keep_alive(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        while not self._stop.wait(interval):
            while not self._stop.is_set():
                sent = time.monotonic()
                left = self._valid_until - sent
                if left <= 0:
                    self.lost.set()
                    return
                try:
                    ttl = int(self.client.request("POST", f"/lease/{self.id}/keepalive", idempotent=True,
                                                  timeout=max(min(left, interval), 0.2)).json()["ttl"])
                    self._valid_until = sent + ttl
                    break
                except NotFound:
                    self.lost.set()
                    return
                except RaftdzmqError:
                    self._stop.wait(0.1)  # keep trying until the lease may be gone

    def close(self) -> None:
        """Stop the keepalives (the lease then expires after its TTL)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.client.timeout + self.ttl)

    def revoke(self) -> None:
        """Stop the keepalives and revoke the lease (its keys go); a lease already gone is not an error. A revoke
        whose outcome is unknown is tried again (a revoke twice is a NotFound, which is fine)."""
        self.close()
        for _ in range(3):
            try:
                self.client.revoke(self.id)
                break
            except NotFound:
                break
            except OutcomeUnknown:
                continue
        self.lost.set()
