"""-forward's connections to the leader: a small pool of keep-alive HTTP connections a follower passes requests
on with, instead of one new TCP connection per request (review edge3, L4: 2,000 forwards left 2,007 sockets in
TIME_WAIT, which off loopback caps a follower at a few hundred forwards a second before connects fail).

Rules:
- At most FORWARD_CONNECTIONS connections to the leader at once, idle or in use; a request waits for a free one
  at most its timeout (then NotSent: nothing reached the leader), then goes to the leader the node knows once
  one is free (`leader`), not the one it knew before its wait. One request at a time on a connection.
- The pool keeps the connections of one leader address: when the leader's address changes (seen by the next
  forward, or by the node's periodic look: keep_only), when the node leads itself and when it stops, the idle
  ones are closed, and one in use is closed when its request ends. A connection is closed on any error, on an
  answer that ends it (`Connection: close`), on an interim answer (1xx) where the final one was due (no answer:
  the real one would be left for the next request), and when found dropped before reuse (the leader closed it,
  or sent bytes nobody asked for: readable while idle).
- A request is sent again (once, on a new connection) only when it cannot have reached the leader whole: its
  send failed (the leader's edge runs nothing before a whole request has arrived), or it was a GET or HEAD (safe
  to repeat) on a reused connection that gave no answer. A write sent whole on a reused connection that gave no
  answer is NoAnswer (outcome unknown), never sent again: the leader may have read it before the connection
  ended. The check before reuse catches a connection the leader closed while it was idle (the keep-alive race);
  a close in the instant between that check and the leader reading the request is reported as unknown.
- Every wait is bounded by the request's timeout: the wait for a connection, connect, each send and each read.
- Greenlets only (the node is monkey-patched: http.client runs on gevent's sockets); no threads.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

import gevent.lock
from gevent import monkey

FORWARD_CONNECTIONS = 32  # connections to the leader one follower keeps at most (idle or in use)
SAFE_TO_REPEAT = frozenset(("GET", "HEAD"))

_poll = monkey.get_original("select", "poll")  # a look at a socket that never waits: not gevent's


class NotSent(Exception):
    """The request did not reach the leader whole: it was not applied."""


class NoAnswer(Exception):
    """The request was sent whole and no answer came: the leader may have applied it."""


class Answer:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.status, self.body, self.headers = status, body, headers


def dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection is of no more use: closed, or readable (the leader's FIN or RST, or
    bytes no request asked for)."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return True
    try:
        poller = _poll()
        poller.register(sock.fileno(), 0x001 | 0x008 | 0x010)  # POLLIN, POLLERR, POLLHUP
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class LeaderConnections:
    """The pool of one follower (see the module's rules). `connect(host, port, timeout=...)` makes a connection
    (http.client.HTTPConnection, or a test's). `opened` counts the connections made, `resent` the requests sent
    again after a reused connection failed."""

    def __init__(self, size: int = FORWARD_CONNECTIONS) -> None:
        self.size = size
        self.address: str | None = None
        self.idle: list[http.client.HTTPConnection] = []
        self.slots = gevent.lock.BoundedSemaphore(size)
        self.opened = 0
        self.resent = 0

    def forward(self, connect: Callable[..., http.client.HTTPConnection], address: str, method: str, target: str,
                body: bytes, headers: dict[str, str], timeout: float,
                leader: Callable[[], str | None] | None = None) -> Answer:
        """The leader's answer to the request; raises NotSent or NoAnswer. `leader`, when given, names the leader's
        address as the node knows it now: asked again once a connection is free, for the wait may have outlasted
        the leader `address` named (review fwd, F3); None then is NotSent."""
        if not self.slots.acquire(timeout=timeout):
            raise NotSent(f"all {self.size} connections to the leader stayed busy for {timeout:g}s")
        try:
            if leader is not None:
                now = leader()
                if now is None:
                    raise NotSent("no leader was known once a connection to it was free")
                address = now
            conn = self._take(connect, address, timeout)
            try:
                return self._exchange(conn, address, method, target, body, headers)
            except _Retry:  # a reused connection failed before the request can have reached the leader
                self.resent += 1
                return self._exchange(self._open(connect, address, timeout), address, method, target, body, headers)
        finally:
            self.slots.release()

    def _take(self, connect, address: str, timeout: float) -> http.client.HTTPConnection | _Fresh:
        if address != self.address:
            self.close()
            self.address = address
        while self.idle:
            conn = self.idle.pop()
            if not dropped(conn):
                return conn
            conn.close()
        return self._open(connect, address, timeout)

    def _open(self, connect, address: str, timeout: float) -> _Fresh:
        host, port = address.rsplit(":", 1)
        self.opened += 1
        return _Fresh(connect(host, int(port), timeout=timeout))

    def _exchange(self, conn: http.client.HTTPConnection | _Fresh, address: str, method: str, target: str, body: bytes,
                  headers: dict[str, str]) -> Answer:
        """One request on `conn`: the answer (and `conn` back in the pool when it can carry another), or _Retry
        (when another connection may carry the request), NotSent or NoAnswer; `conn` is closed on any failure."""
        fresh = isinstance(conn, _Fresh)
        if isinstance(conn, _Fresh):
            conn = conn.conn
        try:
            try:
                conn.request(method, target, body=body, headers=headers)
            except (OSError, http.client.HTTPException) as e:
                not_sent = NotSent(str(e))
                raise (not_sent if fresh else _Retry(not_sent)) from None
            try:
                resp = conn.getresponse()
                answer = Answer(resp.status, resp.read(), resp.getheaders())
                if resp.status < 200:
                    # An interim answer other than 100 (http.client skips only that one: 102, 103) taken for the
                    # final one would leave the real answer on the connection, for the next request to read
                    # (review fwd, F1). The leader's edge sends none unasked: whatever sent it is no answer.
                    raise http.client.HTTPException(f"an interim answer {resp.status} where the final one was due")
            except (OSError, http.client.HTTPException) as e:
                no_answer = NoAnswer(str(e) or type(e).__name__)
                raise (_Retry(no_answer) if not fresh and method in SAFE_TO_REPEAT else no_answer) from None
        except BaseException:
            conn.close()
            raise
        if getattr(resp, "will_close", True) or address != self.address or len(self.idle) >= self.size:
            conn.close()
        else:
            self.idle.append(conn)
        return answer

    def keep_only(self, address: str | None) -> None:
        """Close the connections unless they go to `address` (the leader as the node now knows it; None when it
        knows none, leads itself, or stops): the idle ones now, one in use when its request ends (review fwd, F2:
        a follower that became leader kept its connections to the old one)."""
        if address != self.address:
            self.close()

    def close(self) -> None:
        """Close the idle connections, and those in use as their requests end (a leader's change; the node's
        stop)."""
        idle, self.idle, self.address = self.idle, [], None
        for conn in idle:
            conn.close()


class _Fresh:
    """A connection just made, not yet used: a failure on it is the request's, never a stale connection's."""

    __slots__ = ("conn",)

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn


class _Retry(Exception):
    """Internal: the request cannot have reached the leader (or is safe to repeat): it may go on a new connection."""
