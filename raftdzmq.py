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
import json  # noqa: E402
import logging  # noqa: E402
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

import gevent  # noqa: E402
import gevent.hub  # noqa: E402
import gevent.pool  # noqa: E402
import gevent.pywsgi  # noqa: E402

from raftlib import (  # noqa: E402
    Config,
    RaftNode,
    Role,
)
from raftlib.runtime import Runtime  # noqa: E402
from raftlib.storage import DiskStorage, NotJoined, StorageError, start_node  # noqa: E402
from raftlib.transport import CURVE_AVAILABLE, ZmqTransport  # noqa: E402
from raftlib.server.admin import (  # noqa: E402
    SECRET_ENV,
    AdminGuard,
    SecretError,
    admin_headers,
    read_secret,
)
from raftlib.server.api import Api, make_app  # noqa: E402
from raftlib.server.edge import EdgeServer, connection_bound, listen, raise_descriptor_limit  # noqa: E402
from raftlib.server.metrics import Metrics  # noqa: E402
from raftlib.server.store import (  # noqa: E402
    KeyValueStore,
)

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
        stored = self.storage.load()
        try:
            # Identity, the JOINING marker and the bootstrap, crash-safe (raftlib.storage.start_node says how).
            start = start_node(self.storage, stored, binascii.hexlify(os.urandom(4)).decode(), self.raft_address,
                               self.http_address, join=bool(args.join))
        except BaseException:
            self.storage.close()
            raise
        self.node_id, stored = start.node_id, start.stored
        self.bootstrapped, self.must_join, self.joined_before = start.bootstrapped, start.must_join, start.joined_before
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
        self.metrics.bind(self.runtime.status)
        self.http = None
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
        listener = listen(self._bind_host(), self.args.http_port)
        args = self.args
        # A request may legitimately take receiving, then its route's own bounds (a write or a read waits at most
        # twice its timeout: a first try, then a retry or the read after a wait for an index), then -idle-timeout
        # more for a client slow to take its answer.
        longest_route_seconds = 2 * max(args.write_timeout, args.read_timeout) + 1
        api = Api(self.runtime, self.kv, self.metrics, write_timeout_seconds=args.write_timeout,
                  read_timeout_seconds=args.read_timeout, forward=args.forward,
                  guard=None if self.secret is None else AdminGuard(self.secret))
        self.http = EdgeServer(listener, make_app(api), max_connections=args.max_connections,
                               idle_timeout_seconds=args.idle_timeout, receive_timeout_seconds=args.receive_timeout,
                               busy_timeout_seconds=args.receive_timeout + longest_route_seconds + args.idle_timeout,
                               max_header_bytes=args.max_header_bytes, max_body_bytes=args.max_body)
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
                split = urllib.parse.urlsplit(url)
                target = split.path + (f"?{split.query}" if split.query else "")
                headers.update(admin_headers(self.secret, "POST", target, body))  # a fresh timestamp each try
            req = urllib.request.Request(url, data=body, method="POST", headers=headers)
            try:
                with _no_redirects.open(req, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) as resp:
                    resp.read()
                self.storage.remove_join_marker()  # "joined": a leader accepted the join (issue 11)
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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_no_redirects = urllib.request.build_opener(_NoRedirect)


# ---- command line ---------------------------------------------------------------------------------------


def load_secret(args) -> bytes | None:
    """The cluster secret from -secret-file, else from $RAFTDZMQ_SECRET; None when neither is given. Exits when a
    secret is given and this libzmq cannot use it (no CURVE)."""
    try:
        secret = read_secret(args.secret_file)
    except SecretError as e:
        raise SystemExit(f"raftdzmq: {e}") from None
    if secret is not None and not CURVE_AVAILABLE:
        raise SystemExit("raftdzmq: a cluster secret needs CURVE, and this pyzmq's libzmq has none (zmq.has('curve') "
                         "is False): install a pyzmq wheel")
    return secret


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
    p.add_argument("-max-header-bytes", "--max-header-bytes", dest="max_header_bytes", type=int, default=32 << 10,
                   help="largest request head (request line and header fields) in bytes; larger gets 431 "
                        "(default 32 KiB)")
    p.add_argument("-max-connections", "--max-connections", dest="max_connections", type=int, default=None,
                   help="most HTTP connections at once; when full, the longest idle one is closed for a new one "
                        "(default: half the descriptors left under ulimit -n after 100 kept for Raft and the log, "
                        "at most 1000)")
    p.add_argument("-idle-timeout", "--idle-timeout", dest="idle_timeout", type=float, default=60.0,
                   help="seconds an HTTP connection may wait for its next request before it is closed, and may "
                        "take beyond the request's own bounds to read its answer (default 60)")
    p.add_argument("-receive-timeout", "--receive-timeout", dest="receive_timeout", type=float, default=10.0,
                   help="seconds a client has to send a whole request (head and body) once it has begun; 408 "
                        "after (default 10)")
    p.add_argument("-snapshot-threshold", "--snapshot-threshold", dest="snapshot_threshold", type=int,
                   default=16 << 20, help="take a snapshot when the log since the last one passes this many bytes "
                   "(default 16 MiB)")
    p.add_argument("-secret-file", "--secret-file", dest="secret_file", default=None, metavar="PATH",
                   help=f"a file holding the cluster secret (or set ${SECRET_ENV}): raft connections use CURVE keys "
                        "derived from it, and every join and /cluster change is signed with it (HMAC-SHA256); nodes "
                        "and requests without it are refused")
    p.add_argument("-sign", "--sign", nargs=2, metavar=("METHOD", "TARGET"), default=None,
                   help="print the headers that sign this admin request with the cluster secret, for curl -H @FILE "
                        "(e.g. -sign DELETE /cluster/ab12cd34), and exit; no DATA_DIR")
    p.add_argument("-sign-body", "--sign-body", dest="sign_body", default=None, metavar="FILE",
                   help="with -sign: the request's body, from this file ('-': standard input)")
    p.add_argument("-no-fsync", "--no-fsync", dest="no_fsync", action="store_true",
                   help="UNSAFE, for experiments only: do not fsync the log")
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="?", help="where this node keeps its log and snapshots")
    args = p.parse_args(argv)
    if args.sign is None and args.data_dir is None:
        p.error("the following arguments are required: DATA_DIR")
    for name in ("max_body", "max_header_bytes", "idle_timeout", "receive_timeout"):
        if getattr(args, name) <= 0:
            p.error(f"-{name.replace('_', '-')} must be positive")
    safe = connection_bound()
    if args.max_connections is None:
        args.max_connections = min(1000, safe)
    elif not 0 < args.max_connections <= safe:
        p.error(f"-max-connections must be 1 to {safe} under this ulimit -n (descriptors kept for Raft and the log)")
    return args


def print_signed_headers(args) -> int:
    """-sign METHOD TARGET: print X-Raftdzmq-Timestamp and X-Raftdzmq-Signature lines (curl -H @FILE reads them)."""
    secret = load_secret(args)
    if secret is None:
        print(f"raftdzmq: -sign needs the cluster secret: -secret-file PATH or ${SECRET_ENV}", file=sys.stderr)
        return 2
    body = b""
    if args.sign_body == "-":
        body = sys.stdin.buffer.read()
    elif args.sign_body:
        with open(args.sign_body, "rb") as f:
            body = f.read()
    method, target = args.sign
    for name, value in admin_headers(secret, method.upper(), target, body).items():
        print(f"{name}: {value}")
    return 0


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
    raise_descriptor_limit()  # before parse_args: the default -max-connections depends on it
    args = parse_args(argv)
    if args.sign is not None:
        return print_signed_headers(args)
    args.data_dir = os.path.expanduser(args.data_dir)
    setup_logging(args)
    try:
        server = Server(args)
    except (StorageError, NotJoined) as e:
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
    elif server.must_join:
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
