#!/usr/bin/env python
"""raftdzmq: a Raft-replicated key/value server. Raft over zmq.green REQ/REP with CBOR messages, a Bottle HTTP
API on gevent's WSGI server, and an append-only log in the data dir.

    python raftdzmq.py -p 5555 -hp 8080 ~/node.1
    python raftdzmq.py -p 5556 -hp 8081 -join localhost:8080 ~/node.2

This file is the only one that monkey-patches gevent, in its first lines.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import binascii  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import hmac  # noqa: E402
import ipaddress  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

import bottle  # noqa: E402
import cbor2  # noqa: E402
import prometheus_client as prom  # noqa: E402
import prometheus_client.core as prom_core  # noqa: E402
import prometheus_client.utils as prom_utils  # noqa: E402
import gevent  # noqa: E402
import gevent.pywsgi  # noqa: E402

from raftlib import (  # noqa: E402
    ConfChange,
    ConfChangeKind,
    Config,
    Entry,
    EntryKind,
    HardState,
    Member,
    Membership,
    NotLeader,
    ProposalDropped,
    RaftNode,
    Role,
)
from raftlib import codec  # noqa: E402
from raftlib.runtime import EntryLost, Runtime, StateMachine, Stopped, Timeout  # noqa: E402
from raftlib.storage import DiskFull, DiskStorage, StorageError  # noqa: E402
from raftlib.transport import ZmqTransport  # noqa: E402

log = logging.getLogger("raftdzmq")
TRACE = 5
NOT_LEADER = "raft.Server: Not current leader"
# Test-only (tests/faults.py), ignored unless set: RAFTDZMQ_TEST_FSYNC_DELAY_FILE names a file holding a number of
# seconds; while it exists, every log fdatasync first blocks the whole process that long, as a slow disk does.
TEST_FSYNC_DELAY_FILE = os.environ.get("RAFTDZMQ_TEST_FSYNC_DELAY_FILE")


def _test_fsync_delay(path: str) -> None:
    try:
        with open(path) as f:
            seconds = float(f.read())
    except (OSError, ValueError):
        return
    monkey.get_original("time", "sleep")(seconds)  # not gevent's sleep: a slow fsync holds the hub too


# Commands, as CBOR arrays [op, key, value, expected].
SET, DELETE, COMPARE_AND_SET, CREATE = 0, 1, 2, 3


class KeyValueStore(StateMachine):
    """The replicated state: keys (str) to values (bytes). Commands are applied in log order, atomically."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.applied_index = 0

    @staticmethod
    def command(op: int, key: str, value: bytes = b"", expected: bytes | None = None) -> bytes:
        return cbor2.dumps([op, key, value, expected])

    def apply(self, index: int, command: bytes) -> str:
        self.applied_index = index
        try:
            op, key, value, expected = cbor2.loads(command)
        except Exception:
            log.error("skipping an undecodable command at index %d", index)
            return "error"
        data = self.data
        if op == SET:
            data[key] = value
        elif op == DELETE:
            if data.pop(key, None) is None:
                return "missing"
        elif op == COMPARE_AND_SET:
            if data.get(key) != expected:
                return "failed"
            data[key] = value
        elif op == CREATE:
            if key in data:
                return "failed"
            data[key] = value
        return "ok"

    def snapshot(self) -> bytes:
        return cbor2.dumps(self.data)

    def restore(self, data: bytes) -> None:
        self.data = cbor2.loads(data) if data else {}


# ---- metrics ---------------------------------------------------------------------------------------------


class _Counter:
    """A counter by one label, kept in a dict. prometheus_client's metrics take a lock on every update (a gevent
    lock here: ~2.5% of a write at 64 clients for the write metrics); all updates come from this one thread."""

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.values: collections.Counter = collections.Counter()

    def inc(self, label_value: str) -> None:
        self.values[label_value] += 1

    def collect(self):
        family = prom_core.CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, count in sorted(self.values.items()):
            family.add_metric([value], count)
        return family


class _Histogram:
    """A histogram kept in a list of bucket counts (see _Counter)."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def collect(self):
        cumulative, rows = 0, []
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            rows.append((prom_utils.floatToGoString(bound), cumulative))
        family = prom_core.HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], rows, self.sum)
        return family


class Metrics:
    """Prometheus metrics for GET /metrics, in a registry of this node's own."""

    def __init__(self) -> None:
        r = self.registry = prom.CollectorRegistry()
        self.writes = _Counter("raftdzmq_writes", "Writes answered, by outcome", "outcome")
        self.write_seconds = _Histogram("raftdzmq_write_seconds", "Time from proposal to commit and apply",
                                        (.0005, .001, .002, .005, .01, .02, .05, .1, .5, 2))
        self.fsync_seconds = _Histogram("raftdzmq_fsync_seconds", "Log fdatasync time per batch",
                                        (.00005, .0001, .0002, .0005, .001, .002, .005, .01, .05))
        self.reads = _Counter("raftdzmq_reads", "Reads answered, by consistency", "consistency")
        self.read_index_seconds = _Histogram("raftdzmq_read_index_seconds", "Time to confirm a read index",
                                             (.0005, .001, .002, .005, .01, .05, .1, .5))
        self.hub_lag_seconds = _Histogram("raftdzmq_hub_lag_seconds", "How late a 10 ms gevent timer fires: the "
                                          "delay every timer (ticks, heartbeats, elections) sees",
                                          (.001, .002, .005, .01, .02, .05, .1, .25, .5, 1))
        r.register(self)

    def collect(self):
        for m in (self.writes, self.write_seconds, self.fsync_seconds, self.reads, self.read_index_seconds,
                  self.hub_lag_seconds):
            yield m.collect()

    def watch_hub_lag(self, period: float = 0.01) -> None:
        """Runs in a greenlet of its own: sleep `period` and note how late the wake-up came."""
        while True:
            t0 = time.monotonic()
            gevent.sleep(period)
            self.hub_lag_seconds.observe(max(0.0, time.monotonic() - t0 - period))

    def bind(self, server: "Server") -> None:
        node, runtime = server.node, server.runtime
        r = self.registry
        for name, doc, fn in (
            ("raftdzmq_term", "Current term", lambda: node.current_term),
            ("raftdzmq_commit_index", "Commit index", lambda: node.commit_index),
            ("raftdzmq_applied_index", "Last applied index", lambda: node.last_applied),
            ("raftdzmq_last_index", "Last log index", lambda: node.log.last_index),
            ("raftdzmq_snapshot_index", "Index of the newest snapshot", lambda: node.log.snapshot_index),
            ("raftdzmq_is_leader", "1 on the leader", lambda: int(node.role is Role.LEADER)),
            ("raftdzmq_proposals", "Proposals taken by this node as leader", lambda: runtime.stats["proposals"]),
            ("raftdzmq_applied_entries", "Entries applied", lambda: runtime.stats["applied"]),
            ("raftdzmq_elections_won", "Elections this node won", lambda: runtime.stats["elections_won"]),
            ("raftdzmq_batches_saved", "Batches made durable (one fsync each)", lambda: runtime.stats["saves"]),
            ("raftdzmq_snapshots", "Snapshots taken", lambda: runtime.stats["snapshots"]),
        ):
            prom.Gauge(name, doc, registry=r).set_function(fn)


# ---- the server -----------------------------------------------------------------------------------------


class Server:
    def __init__(self, args) -> None:
        self.args = args
        self.raft_address = f"{args.host}:{args.port}"
        self.http_address = f"{args.host}:{args.http_port}"
        self.secret = load_secret(args)
        self.metrics = Metrics()

        def timed_fdatasync(fd: int, nbytes: int) -> None:
            t0 = time.perf_counter()
            if TEST_FSYNC_DELAY_FILE:
                _test_fsync_delay(TEST_FSYNC_DELAY_FILE)
            # Inline: it holds the hub for the fsync (~0.1-0.8 ms here). gevent's thread pool would free the hub
            # meanwhile, but in alternating 3-node runs at 64 clients the hand-off cost as much as it won, on the
            # leader (p50 latency was higher) and more so on the followers, which have nothing else to do.
            os.fdatasync(fd)
            self.metrics.fsync_seconds.observe(time.perf_counter() - t0)

        self.storage = DiskStorage(args.data_dir, fsync=not args.no_fsync, fdatasync=timed_fdatasync)
        identity = self.storage.read_identity()
        stored = self.storage.load()
        self.joined_before = identity is not None
        if identity is None:
            self.node_id = binascii.hexlify(os.urandom(4)).decode()
            self.storage.write_identity(self.node_id, self.raft_address, self.http_address)
        else:
            self.node_id = identity["node_id"]
            if (identity.get("raft_address"), identity.get("http_address")) != (self.raft_address, self.http_address):
                log.warning("this node was created with addresses %s / %s; the cluster still knows it by those",
                            identity.get("raft_address"), identity.get("http_address"))
        self.bootstrapped = False
        if identity is None and not args.join:
            # The first node of a new cluster: a configuration with itself as the only voter (index 1).
            me = Member(self.node_id, self.raft_address, self.http_address)
            first = Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership((self.node_id,), (), (me,)))
            self.storage.save(HardState(1, None, 1), [first])
            stored = self.storage.state
            self.bootstrapped = True
        tick = args.heartbeat_ms / 1000.0 / 5
        config = Config(
            node_id=self.node_id,
            election_ticks=max(2, int(args.election_ms / 1000.0 / tick)),
            heartbeat_ticks=5,
        )
        self.node = RaftNode(
            config,
            random.Random(),
            stored.hard_state,
            stored.raft_log(),
            stored.snapshot,
        )
        self.kv = KeyValueStore()
        if stored.snapshot is not None:
            self.kv.restore(stored.snapshot.data)
        self.transport = ZmqTransport(self.node_id, f"{self._bind_host()}:{args.port}", self._deliver,
                                      reply_timeout_seconds=max(0.2, args.election_ms / 1000.0), secret=self.secret)
        self.runtime = Runtime(self.node, self.storage, self.transport, self.kv, tick_seconds=tick,
                               snapshot_threshold_bytes=args.snapshot_threshold, on_fatal=self._fatal)
        self.metrics.bind(self)
        self.http = None
        self._requests = 0
        self._stopping = False

    def _bind_host(self) -> str:
        host = self.args.host
        return "127.0.0.1" if host == "localhost" else host

    def _deliver(self, messages, reply_wanted):
        return self.runtime.deliver(messages, reply_wanted)

    def _fatal(self, error: Exception) -> None:
        log.critical("storage failed (%s); exiting without acknowledging anything more", error)
        os._exit(3)

    # ---- lifecycle ----

    def start(self) -> None:
        self.transport.start()
        self.runtime.start()
        listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # gevent.pywsgi writes headers and body separately: without TCP_NODELAY each keep-alive response
        # waits ~40 ms for Nagle and delayed ACK (STACK-NOTES.md). Accepted sockets inherit the option.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind((self._bind_host(), self.args.http_port))
        listener.listen(1024)
        self.http = gevent.pywsgi.WSGIServer(listener, make_app(self), log=None, error_log=log,
                                             handler_class=_QuietHandler)
        self.http.start()
        gevent.spawn(self.metrics.watch_hub_lag)
        log.info("node %s serving http://%s (raft tcp://%s), data in %s", self.node_id, self.http_address,
                 self.raft_address, self.args.data_dir)
        if self.secret is None and not _is_loopback(self._bind_host()):
            log.warning("listening on %s beyond loopback without a cluster secret: anyone who can reach the raft port "
                        "can speak for a member, and anyone who reaches the http port can join; give every node "
                        "-secret-file (or %s)", self._bind_host(), SECRET_ENV)

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down")
        if self.node.role is Role.LEADER and len(self.node.membership.voters) > 1:
            target = self._best_successor()
            if target is not None:
                try:
                    self.runtime.transfer_leadership(target, timeout_seconds=2.0)
                    log.info("handed leadership to %s", target)
                except Exception as e:
                    log.warning("leadership transfer before shutdown failed: %s", e)
        if self.http is not None:
            self.http.stop(timeout=1)
        self.runtime.stop()
        self.transport.stop()
        self.storage.close()
        log.info("stopped")

    def _best_successor(self) -> str | None:
        best, best_match = None, -1
        for v in self.node.membership.voters:
            pr = self.node.progress(v)
            if v != self.node_id and pr is not None and pr.match_index > best_match:
                best, best_match = v, pr.match_index
        return best

    # ---- cluster ----

    def leader_http(self) -> str | None:
        leader = self.node.leader_id
        if leader is None:
            return None
        m = self.node.membership.member(leader)
        return m.http_address if m else None

    def join(self, target: str) -> None:
        """Ask `target` (host:httpport) to add this node; follow redirects to the leader; bounded in time."""
        body = json.dumps({"node_id": self.node_id, "raft_address": self.raft_address,
                           "http_address": self.http_address}).encode()
        deadline = time.monotonic() + self.args.join_timeout
        url = f"http://{target}/join"
        last_error = "no answer"
        while time.monotonic() < deadline:
            headers = {"Content-Type": "application/json"}
            if self.secret is not None:
                headers[SIGNATURE_HEADER] = codec.sign(self.secret, body).hex()
            req = urllib.request.Request(url, data=body, method="POST", headers=headers)
            try:
                with _no_redirects.open(req, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) as resp:
                    resp.read()
                log.info("joined the cluster through %s", url)
                return
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace").strip()
                if e.code == 307 and e.headers.get("Location"):
                    url = e.headers["Location"]
                    continue
                if e.code >= 500:
                    last_error = f"{e.code} {text}"
                else:
                    raise SystemExit(f"raftdzmq: join refused by {url}: {e.code} {text}")
            except (OSError, urllib.error.URLError) as e:
                last_error = str(getattr(e, "reason", e))
            gevent.sleep(0.2)
        raise SystemExit(f"raftdzmq: could not join the cluster at {target} within {self.args.join_timeout:g}s: "
                         f"{last_error}")


class RequestHeaders:
    """The request headers as gevent.pywsgi uses them (get, getheader, headers, typeheader, status), read without
    the email package: http.client.parse_headers cost ~10% of a leader's CPU at 64 clients (py-spy). Bad or
    oversized header blocks set `status`, which pywsgi answers with 400."""

    __slots__ = ("_pairs", "_first", "status")
    MAX_LINE, MAX_HEADERS = 65536, 100

    def __init__(self, rfile) -> None:
        self.status = ""
        self._pairs: list[tuple[str, str]] = []
        self._first: dict[str, str] = {}
        while True:
            line = rfile.readline(self.MAX_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                return
            if len(line) > self.MAX_LINE:
                self.status = "header line too long"
                return
            if len(self._pairs) >= self.MAX_HEADERS:
                self.status = "too many headers"
                return
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name[0] in " \t" or name != name.rstrip():
                self.status = "malformed header line"  # also obsolete line folding (RFC 9112 §5.2)
                return
            value = value.strip()
            self._pairs.append((name, value))
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default=None):
        return self._first.get(name.lower(), default)

    getheader = get

    @property
    def headers(self):
        for name, value in self._pairs:
            yield f"{name}: {value}\r\n"

    @property
    def typeheader(self):
        return self._first.get("content-type")


class _QuietHandler(gevent.pywsgi.WSGIHandler):
    _date = (0, b"")  # (second, its Date header): pywsgi formats one per response (~1% of a write)

    def log_request(self):  # formatting an access log line per request costs ~3% of a write; -v logs in Bottle
        pass

    def finalize_headers(self):
        if self.provided_date is None:
            now = int(time.time())
            if _QuietHandler._date[0] != now:
                _QuietHandler._date = (now, gevent.pywsgi.format_date_time(now))
            self.response_headers.append((b"Date", _QuietHandler._date[1]))
            self.provided_date = True
        super().finalize_headers()

    def MessageClass(self, rfile, *_):  # noqa: N802 (pywsgi's name)
        return RequestHeaders(rfile)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_no_redirects = urllib.request.build_opener(_NoRedirect)


# ---- HTTP ---------------------------------------------------------------------------------------------------


def text(status: int, message: str, **headers) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(message + "\n", status, {"Content-Type": "text/plain; charset=utf-8", **headers})


def make_app(server: Server) -> bottle.Bottle:
    app = bottle.Bottle(catchall=True)
    args = server.args
    runtime = server.runtime
    metrics = server.metrics
    bottle.BaseRequest.MEMFILE_MAX = args.max_body + 1

    def default_error(res):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"{res.status_line}: {res.body}\n" if isinstance(res.body, str) and res.body else f"{res.status_line}\n"

    app.default_error_handler = default_error

    @app.hook("before_request")
    def _yield_now_and_then():
        # A keep-alive connection with its next request waiting never yields; without this, timers (elections,
        # heartbeats) starve under load (STACK-NOTES.md), and so do connections whose requests are still in the
        # socket. A tiny sleep yields to the next turn of the event loop, which polls every socket and runs the
        # timers; gevent.idle() (used before) waits until nothing else at all is runnable, which made its
        # request wait for everybody else's. Alternating 3-node runs at 64 clients (raftdzmq_hub_lag_seconds
        # p99 <= 10 ms in all): idle every 4 requests 4,530 writes/s, p99 65 ms; sleep every 4: 5,637/s, p99
        # 25 ms; sleep every 16: 6,532/s, p99 20 ms (5,712/s, p99 25 ms for every 4 in that run).
        server._requests += 1
        if server._requests % 16 == 0:
            gevent.sleep(0.00001)

    def redirect_to_leader():
        leader = server.leader_http()
        if leader is None:
            return text(503, "no leader is known right now; retry shortly")
        if args.forward and bottle.request.get_header("X-Raftdzmq-Forwarded") is None:
            return forward_to(leader)
        url = f"http://{leader}{bottle.request.fullpath}"
        if bottle.request.query_string:
            url += "?" + bottle.request.query_string
        return text(307, NOT_LEADER, Location=url)

    def forward_to(leader: str) -> bottle.HTTPResponse:
        """-forward: proxy this request to the leader and hand back its answer (one hop only)."""
        req = bottle.request
        body = read_body()
        host, port = leader.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=args.write_timeout + 1)
        try:
            conn.request(req.method, req.fullpath + ("?" + req.query_string if req.query_string else ""), body=body,
                         headers={"X-Raftdzmq-Forwarded": server.node_id, "Content-Type": req.content_type or ""})
            resp = conn.getresponse()
            keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "x-raft-index", "location")}
            return bottle.HTTPResponse(resp.read(), resp.status, keep)
        except OSError as e:
            return text(503, f"could not forward to the leader at {leader}: {e}; outcome unknown")
        finally:
            conn.close()

    def read_body() -> bytes:
        environ = bottle.request.environ
        if "raftdzmq.body" in environ:  # read already (a handler, then forward_to)
            return environ["raftdzmq.body"]
        length = int(environ.get("CONTENT_LENGTH") or -1)
        if length > args.max_body:
            raise text(413, f"body of {length} bytes is over the {args.max_body} byte limit")
        try:
            if length >= 0 and "HTTP_TRANSFER_ENCODING" not in environ:
                # Straight from the socket: Bottle's request.body copies it through a BytesIO (~3% of a write).
                body = environ["wsgi.input"].read(length)
                if len(body) != length:
                    raise OSError(f"{len(body)} of {length} bytes")
            else:
                body = bottle.request.body.read()
            environ["raftdzmq.body"] = body
            return body
        except OSError as e:  # the client went away (or lied about the length) in the middle of its body
            raise text(400, f"request body cut short: {e}") from None


    def propose(command: bytes):
        if server.node.role is not Role.LEADER:
            raise redirect_to_leader()
        t0 = time.perf_counter()
        try:
            result = runtime.propose(command, args.write_timeout)
        except NotLeader:
            metrics.writes.inc("redirected")
            raise redirect_to_leader() from None
        except ProposalDropped as e:
            metrics.writes.inc("refused")
            raise text(503, f"write refused for now: {e}; retry") from None
        except EntryLost:
            metrics.writes.inc("lost")
            raise text(503, "write lost: leadership changed before it committed; it was not applied") from None
        except Timeout:
            metrics.writes.inc("unknown")
            raise text(503, f"write not confirmed within {args.write_timeout:g}s; its outcome is unknown") from None
        except DiskFull as e:
            metrics.writes.inc("refused")
            raise text(507, f"write refused: {e}; it was not applied") from None
        except Stopped as e:
            raise text(503, str(e)) from None
        metrics.write_seconds.observe(time.perf_counter() - t0)
        metrics.writes.inc("committed")
        return result

    def check_key(key: str) -> str:
        if not key or len(key.encode()) > 4096:
            raise text(400, "key must be 1 to 4096 bytes")
        return key

    @app.post("/db/<key:path>")
    @app.put("/db/<key:path>")
    def set_key(key):
        key = check_key(key)
        value = read_body()
        q = bottle.request.query if bottle.request.environ.get("QUERY_STRING") else {}
        if "prev_value" in q:
            cmd = KeyValueStore.command(COMPARE_AND_SET, key, value, q.prev_value.encode())
        elif q.get("prev_exist") == "false":
            cmd = KeyValueStore.command(CREATE, key, value)
        else:
            cmd = KeyValueStore.command(SET, key, value)
        index, result = propose(cmd)
        if result == "failed":
            return text(412, "precondition failed", **{"X-Raft-Index": str(index)})
        bottle.response.set_header("X-Raft-Index", str(index))
        return ""

    @app.delete("/db/<key:path>")
    def delete_key(key):
        index, result = propose(KeyValueStore.command(DELETE, check_key(key)))
        if result == "missing":
            return text(404, f"no such key: {key}", **{"X-Raft-Index": str(index)})
        return bottle.HTTPResponse("", 200, {"X-Raft-Index": str(index)})

    def wait_consistent():
        q = bottle.request.query
        consistency = q.get("consistency", "linearizable")
        if "min_index" in q:
            try:
                min_index = int(q.min_index)
            except ValueError:
                raise text(400, "min_index must be an integer") from None
            try:
                runtime.wait_applied(min_index, args.read_timeout)
            except Timeout:
                raise text(503, f"index {min_index} not applied here within {args.read_timeout:g}s") from None
        if consistency == "stale":
            metrics.reads.inc("stale")
            return
        if consistency not in ("linearizable", "lease"):
            raise text(400, "consistency must be linearizable, lease or stale")
        metrics.reads.inc(consistency)
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.read_timeout
        try:
            while True:
                try:
                    runtime.read(max(0.01, deadline - time.monotonic()), lease=consistency == "lease")
                    break
                except NotLeader:
                    # Right after a start or an election no leader is known yet: wait for one, within the bound.
                    if time.monotonic() >= deadline:
                        raise text(503, "no leader is known right now; the read cannot be confirmed") from None
                    gevent.sleep(0.02)
        except Timeout:
            raise text(503, f"could not confirm a linearizable read within {args.read_timeout:g}s") from None
        except Stopped as e:
            raise text(503, str(e)) from None
        metrics.read_index_seconds.observe(time.perf_counter() - t0)

    def read_headers() -> dict:
        return {"X-Raft-Applied-Index": str(server.node.last_applied), "X-Raft-Leader": server.node.leader_id or ""}

    @app.get("/db/<key:path>")
    def get_key(key):
        key = check_key(key)
        wait_consistent()
        value = server.kv.data.get(key)
        if value is None:
            return text(404, f"no such key: {key}", **read_headers())
        return bottle.HTTPResponse(value, 200, {"Content-Type": "application/octet-stream", **read_headers()})

    @app.get("/db/")
    @app.get("/db")
    def list_keys():
        q = bottle.request.query
        prefix = q.get("prefix", "")
        try:
            limit = min(max(int(q.get("limit", "1000")), 1), 10000)
        except ValueError:
            raise text(400, "limit must be an integer") from None
        after = q.get("after", "")
        wait_consistent()
        keys = sorted(k for k in server.kv.data if k.startswith(prefix) and k > after)
        page = keys[:limit]
        body = {"keys": page, "next": page[-1] if len(keys) > limit else None}
        return bottle.HTTPResponse(json.dumps(body) + "\n", 200, {"Content-Type": "application/json", **read_headers()})

    @app.post("/join")
    def join():
        raw = read_body()
        if server.secret is not None:
            given = bottle.request.get_header(SIGNATURE_HEADER) or ""
            if not hmac.compare_digest(given.encode(), codec.sign(server.secret, raw).hex().encode()):
                log.warning("refused a join from %s: %s", bottle.request.remote_addr,
                            "no signature" if not given else "signed with a different cluster secret")
                return text(403, "join refused: not signed with this cluster's secret")
        try:
            body = json.loads(raw or b"null")
            fields = [body[k] for k in ("node_id", "raft_address", "http_address")]
            if not all(isinstance(f, str) and 0 < len(f) < 256 for f in fields):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            return text(400, 'bad join body: want JSON {"node_id": ..., "raft_address": ..., "http_address": ...}')
        if server.node.role is not Role.LEADER:
            return redirect_to_leader()
        change = ConfChange(ConfChangeKind.ADD_LEARNER, Member(*fields))
        deadline = time.monotonic() + args.write_timeout
        while True:
            try:
                index, _ = runtime.change_membership(change, args.write_timeout)
                break
            except ProposalDropped as e:  # another change in flight: wait for it
                if time.monotonic() > deadline:
                    return text(503, f"join not possible now: {e}")
                gevent.sleep(0.05)
            except NotLeader:
                return redirect_to_leader()
            except (Timeout, EntryLost, Stopped) as e:
                return text(503, f"join not confirmed: {e}")
            except ValueError as e:
                return text(400, str(e))
        log.info("node %s (%s) joined as a learner", fields[0], fields[2])
        return bottle.HTTPResponse(json.dumps({"index": index}) + "\n", 200, {"Content-Type": "application/json"})

    def members():
        node = server.node
        out = []
        for m in node.membership.members:
            pr = node.progress(m.node_id) if node.role is Role.LEADER else None
            out.append({
                "id": m.node_id, "raft_address": m.raft_address, "http_address": m.http_address,
                "role": "voter" if m.node_id in node.membership.voters else "learner",
                "match_index": (node.log.last_index if m.node_id == node.node_id else pr.match_index) if pr else None,
            })
        return out

    @app.get("/status")
    def status():
        node = server.node
        body = {
            "node_id": node.node_id, "role": node.role.value, "term": node.current_term,
            "leader": node.leader_id, "leader_http": server.leader_http(), "commit_index": node.commit_index,
            "applied_index": node.last_applied, "last_index": node.log.last_index,
            "snapshot_index": node.log.snapshot_index, "members": members(), "keys": len(server.kv.data),
            "disk_full": runtime.disk_full,
        }
        return bottle.HTTPResponse(json.dumps(body, indent=1) + "\n", 200, {"Content-Type": "application/json"})

    @app.get("/metrics")
    def prometheus_metrics():
        return bottle.HTTPResponse(prom.generate_latest(metrics.registry), 200,
                                   {"Content-Type": prom.CONTENT_TYPE_LATEST})

    @app.get("/cluster")
    def cluster():
        return bottle.HTTPResponse(json.dumps(members(), indent=1) + "\n", 200, {"Content-Type": "application/json"})

    @app.delete("/cluster/<node_id>")
    def remove_member(node_id):
        if server.node.role is not Role.LEADER:
            return redirect_to_leader()
        try:
            index, _ = runtime.change_membership(
                ConfChange(ConfChangeKind.REMOVE, Member(node_id)), args.write_timeout)
        except NotLeader:
            return redirect_to_leader()
        except (ProposalDropped, Timeout, EntryLost, Stopped) as e:
            return text(503, f"removal not confirmed: {e}")
        except ValueError as e:
            return text(400, str(e))
        return text(200, f"removed {node_id}", **{"X-Raft-Index": str(index)})

    @app.post("/cluster/transfer")
    def transfer():
        target = bottle.request.query.get("to", "")
        if server.node.role is not Role.LEADER:
            return redirect_to_leader()
        try:
            runtime.transfer_leadership(target, args.write_timeout)
        except NotLeader:
            return redirect_to_leader()
        except ValueError as e:
            return text(400, str(e))
        except (Timeout, Stopped) as e:
            return text(503, f"transfer not confirmed: {e}")
        return text(200, f"leader is now {target}")

    return app


# ---- command line ---------------------------------------------------------------------------------------


SECRET_ENV = "RAFTDZMQ_SECRET"
SIGNATURE_HEADER = "X-Raftdzmq-Signature"


def load_secret(args) -> bytes | None:
    """The cluster secret from -secret-file, else from $RAFTDZMQ_SECRET; None when neither is given."""
    if args.secret_file:
        try:
            with open(os.path.expanduser(args.secret_file), "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise SystemExit(f"raftdzmq: cannot read the secret file: {e}") from None
        if not secret:
            raise SystemExit(f"raftdzmq: the secret file {args.secret_file} is empty")
        return secret
    secret = os.environ.get(SECRET_ENV, "").strip().encode()
    return secret or None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="raftdzmq",
        add_help=False,
        description="A Raft-replicated key/value server: Raft over ZeroMQ, the data over HTTP.",
        epilog="Example: python raftdzmq.py -p 5555 -hp 8080 ~/node.1",
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-p", "--port", type=int, default=5555, help="the Raft (ZeroMQ) port (default 5555)")
    p.add_argument("-hp", "--http-port", dest="http_port", type=int, default=8080, help="the HTTP port (default 8080)")
    p.add_argument("-h", "--host", default="localhost",
                   help="the host this node binds and advertises to its peers (default localhost)")
    p.add_argument("-join", "--join", default=None, metavar="HOST:HTTPPORT",
                   help="join the cluster through this node (followed to the leader); ignored once joined")
    p.add_argument("-v", "--verbose", action="store_true", help="verbose raftdzmq logging (every request)")
    p.add_argument("-debug", "--debug", action="store_true", help="debug-level raft logging")
    p.add_argument("-trace", "--trace", action="store_true", help="trace-level raft logging (every message)")
    p.add_argument("-forward", "--forward", action="store_true",
                   help="followers proxy writes to the leader instead of redirecting with 307")
    p.add_argument("-heartbeat-ms", "--heartbeat-ms", dest="heartbeat_ms", type=float, default=50,
                   help="leader heartbeat interval in ms (default 50)")
    p.add_argument("-election-ms", "--election-ms", dest="election_ms", type=float, default=300,
                   help="election timeout in ms; randomized between this and twice this (default 300)")
    p.add_argument("-write-timeout", "--write-timeout", dest="write_timeout", type=float, default=5.0,
                   help="seconds a write may take to commit before it gets 503 (default 5)")
    p.add_argument("-read-timeout", "--read-timeout", dest="read_timeout", type=float, default=5.0,
                   help="seconds a linearizable read may wait (default 5)")
    p.add_argument("-join-timeout", "--join-timeout", dest="join_timeout", type=float, default=10.0,
                   help="seconds to keep trying to join before giving up (default 10)")
    p.add_argument("-max-body", "--max-body", dest="max_body", type=int, default=1 << 20,
                   help="largest accepted request body in bytes (default 1 MiB)")
    p.add_argument("-snapshot-threshold", "--snapshot-threshold", dest="snapshot_threshold", type=int,
                   default=16 << 20, help="take a snapshot when the log since the last one passes this many bytes "
                   "(default 16 MiB)")
    p.add_argument("-secret-file", "--secret-file", dest="secret_file", default=None, metavar="PATH",
                   help=f"a file holding the cluster secret (or set ${SECRET_ENV}): every raft message and every join "
                        "is signed with it (HMAC-SHA256); nodes and joins without it are refused")
    p.add_argument("-no-fsync", "--no-fsync", dest="no_fsync", action="store_true",
                   help="UNSAFE, for experiments only: do not fsync the log")
    p.add_argument("data_dir", metavar="DATA_DIR", help="where this node keeps its log and snapshots")
    return p.parse_args(argv)


def setup_logging(args, node_label: str = "-") -> None:
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{node_label}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("raftdzmq").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("raftlib").setLevel(TRACE if args.trace else logging.DEBUG if args.debug else logging.INFO)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data_dir = os.path.expanduser(args.data_dir)
    setup_logging(args)
    try:
        server = Server(args)
    except StorageError as e:
        print(f"raftdzmq: {e}", file=sys.stderr)
        return 2
    setup_logging(args, server.node_id)
    try:
        server.start()
    except OSError as e:
        print(f"raftdzmq: cannot listen: {e}", file=sys.stderr)
        return 2
    done = gevent.event.Event()

    def on_signal():
        gevent.spawn(lambda: (server.stop(), done.set()))

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    if server.bootstrapped:
        log.info("bootstrapped a new one-node cluster")
    elif args.join and server.joined_before:
        log.info("this data dir already belongs to a cluster: starting normally, -join %s ignored", args.join)
    elif args.join:
        try:
            server.join(args.join)
        except SystemExit as e:
            print(e, file=sys.stderr)
            server.stop()
            return 1
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
