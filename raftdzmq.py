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
import http.client  # noqa: E402
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

import bottle  # noqa: E402
import prometheus_client as prom  # noqa: E402
import gevent  # noqa: E402
import gevent.hub  # noqa: E402
import gevent.pool  # noqa: E402
import gevent.pywsgi  # noqa: E402

from raftlib import (  # noqa: E402
    ConfChange,
    ConfChangeKind,
    Config,
    Member,
    NotLeader,
    ProposalDropped,
    RaftNode,
    Role,
)
from raftlib.runtime import EntryLost, Runtime, Stopped, Timeout  # noqa: E402
from raftlib.storage import DiskFull, DiskStorage, NotJoined, StorageError, start_node  # noqa: E402
from raftlib.transport import CURVE_AVAILABLE, ZmqTransport  # noqa: E402
from raftlib.server.admin import (  # noqa: E402
    SECRET_ENV,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AdminGuard,
    SecretError,
    admin_headers,
    read_secret,
    wire_target,
)
from raftlib.server.edge import EdgeServer, RateLimitedLog, connection_bound, listen, raise_descriptor_limit  # noqa: E402
from raftlib.server.metrics import Metrics  # noqa: E402
from raftlib.server.store import (  # noqa: E402
    ADMIN_CLAIM,
    COMPARE_AND_SET,
    CREATE,
    DELETE,
    SET,
    KeyValueStore,
    command,
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
        self.http = EdgeServer(listener, make_app(self), max_connections=args.max_connections,
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

    # ---- cluster ----

    def leader_http(self) -> str | None:
        leader = self.node.leader_id
        if leader is None:
            return None
        m = self.node.membership.member(leader)
        return m.http_address if m else None

    def removed_text(self) -> str | None:
        """Why this node serves nothing, when a member told it that it was removed (RaftNode.removed); else None."""
        if self.node.removed is None:
            return None
        leader_id, index = self.node.removed
        return f"this node was removed from the cluster ({f'by {leader_id} ' if leader_id else ''}at or before index {index})"

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

    def redirect_to_leader():
        leader = server.leader_http()
        if leader is None:
            removed = server.removed_text()
            return text(410, removed) if removed else text(503, "no leader is known right now; retry shortly")
        if args.forward and bottle.request.get_header("X-Raftdzmq-Forwarded") is None:
            return forward_to(leader)
        # The target exactly as sent: rebuilding it from the decoded path would change the key (%2541 -> %41,
        # %3F -> a query, /../ resolved) and break on a space or non-ASCII.
        return text(307, NOT_LEADER, Location=f"http://{leader}{wire_target(bottle.request.environ['REQUEST_URI'])}")

    def forward_to(leader: str) -> bottle.HTTPResponse:
        """-forward: proxy this request to the leader and hand back its answer (one hop only). The target goes
        as sent, and with it the admin signature headers, which cover it."""
        req = bottle.request
        host, port = leader.rsplit(":", 1)
        headers = {"X-Raftdzmq-Forwarded": server.node_id, "Content-Type": req.content_type or ""}
        for name in (TIMESTAMP_HEADER, SIGNATURE_HEADER):
            if req.get_header(name) is not None:
                headers[name] = req.get_header(name)
        conn = http.client.HTTPConnection(host, int(port), timeout=args.write_timeout + 1)
        try:
            conn.request(req.method, wire_target(req.environ["REQUEST_URI"]), body=read_body(), headers=headers)
            resp = conn.getresponse()
            keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "x-raft-index", "location")}
            return bottle.HTTPResponse(resp.read(), resp.status, keep)
        except (OSError, http.client.HTTPException) as e:
            return text(503, f"could not forward to the leader at {leader}: {e}; outcome unknown")
        finally:
            conn.close()

    def read_body() -> bytes:
        # Read whole by the edge (EdgeHandler) before any route runs: cut short or too big never gets here.
        return bottle.request.environ["raftdzmq.body"]

    guard = AdminGuard(server.secret) if server.secret is not None else None
    admin_refusals = RateLimitedLog("refused admin requests", log)

    def check_signature(what: str) -> None:
        """With a cluster secret: 403 unless this admin request is signed with it, recently (AdminGuard)."""
        if guard is None:
            return
        req = bottle.request
        reason = guard.verify(req.method, req.environ["REQUEST_URI"], read_body(), req.get_header(TIMESTAMP_HEADER),
                              req.get_header(SIGNATURE_HEADER))
        if reason is not None:
            admin_refusals.log(logging.WARNING, "refused a %s from %s: %s", what, req.remote_addr, reason)
            raise text(403, f"{what} refused: {reason}")

    def claim_signature(what: str) -> None:
        """On the leader, just before acting: refuse a signature already acted on (a replay), here (AdminGuard: no
        log entry for a replay to this leader) or by any leader (AdminClaims, through the log)."""
        if guard is None:
            return
        req = bottle.request
        signature = req.get_header(SIGNATURE_HEADER)
        reason = guard.claim(signature)
        if reason is None:
            claim = command(ADMIN_CLAIM, signature, b"", [float(req.get_header(TIMESTAMP_HEADER)), time.time()])
            try:
                _, result = runtime.propose(claim, args.write_timeout)
            except NotLeader:
                raise redirect_to_leader() from None
            except (ProposalDropped, EntryLost, Timeout, DiskFull, Stopped) as e:
                raise text(503, f"{what} not confirmed ({e}); sign it again to retry") from None
            if result == "used":
                reason = "this signed request was already used, on another leader (a replay); sign it again"
        if reason is not None:
            admin_refusals.log(logging.WARNING, "refused a %s from %s: %s", what, req.remote_addr, reason)
            raise text(403, f"{what} refused: {reason}")

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
            # The percent-decoded bytes as they are (Bottle's q.prev_value turns bytes that are not UTF-8 into "",
            # which would compare against an empty value).
            cmd = command(COMPARE_AND_SET, key, value, q.get("prev_value").encode("latin-1"))
        elif q.get("prev_exist") == "false":
            cmd = command(CREATE, key, value)
        else:
            cmd = command(SET, key, value)
        index, result = propose(cmd)
        if result == "failed":
            return text(412, "precondition failed", **{"X-Raft-Index": str(index)})
        bottle.response.set_header("X-Raft-Index", str(index))
        return ""

    @app.delete("/db/<key:path>")
    def delete_key(key):
        index, result = propose(command(DELETE, check_key(key)))
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
                    if server.removed_text():
                        raise text(410, server.removed_text()) from None
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
        try:  # from UTF-8, as keys are (get() hands back the bytes as latin-1, which matches no non-ASCII key)
            prefix, after = (q.get(name, "").encode("latin-1").decode("utf-8") for name in ("prefix", "after"))
        except UnicodeError:
            raise text(400, "prefix and after must be UTF-8") from None
        try:
            limit = min(max(int(q.get("limit", "1000")), 1), 10000)
        except ValueError:
            raise text(400, "limit must be an integer") from None
        wait_consistent()
        page, more = server.kv.page(prefix, after, limit)
        body = {"keys": page, "next": page[-1] if more else None}
        return bottle.HTTPResponse(json.dumps(body) + "\n", 200, {"Content-Type": "application/json", **read_headers()})

    @app.post("/join")
    def join():
        raw = read_body()
        check_signature("join")
        try:
            body = json.loads(raw or b"null")
            fields = [body[k] for k in ("node_id", "raft_address", "http_address")]
            if not all(isinstance(f, str) and 0 < len(f) < 256 for f in fields):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            return text(400, 'bad join body: want JSON {"node_id": ..., "raft_address": ..., "http_address": ...}')
        if server.node.role is not Role.LEADER:
            return redirect_to_leader()
        claim_signature("join")
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
            "removed": node.removed and {"by": node.removed[0], "index": node.removed[1]},
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
        check_signature("removal")
        if server.node.role is not Role.LEADER:
            return redirect_to_leader()
        claim_signature("removal")
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
        check_signature("transfer")
        if server.node.role is not Role.LEADER:
            return redirect_to_leader()
        claim_signature("transfer")
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
