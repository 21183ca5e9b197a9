"""The HTTP API: the routes as module-level functions of an `Api` (what they share: the runtime, the store, the
metrics, the timeouts), and `failure_answer`, the one place where a failure becomes a status and a line of text.

Rules:
- Every answer that is not a success is one line of text with a 4xx or 5xx status. A route answers bad input
  itself (400, 404, 412); every exception from the runtime or the signature checks goes to `failure_answer`,
  which maps it by the route's operation and the exception's type. An exception it does not know is a bug:
  Bottle answers 500 with one line, and the connection carries on.
- The routes reach the node only through `Api.runtime` (a `Raft`: raftlib.runtime.Runtime, or a fake in tests).
  The status pages (GET /status, GET /cluster) read only `runtime.status()`, a frozen copy; writes and reads, on
  the busiest path, read the few fields of `runtime.node` that `NodeView` names, without a copy.
- A request's body arrives read whole by the edge (environ["raftdzmq.body"]): no route reads the socket.
- Every wait is bounded by -write-timeout or -read-timeout (a write or a read waits at most twice its timeout:
  a first try, then a retry or the read after a wait for an index).
- GET /watch serves watches from this node's own applied state (raftlib.server.watch: the history's rules): no
  forward, no read round, no feature level, no secret (as GET /db). A stream (server-sent events) writes a
  comment every KEEPALIVE_SECONDS while it has nothing to send, and ends when its client goes (edge.Stream) or
  falls behind the history (an `error` event); a long poll (poll=1) waits at most its timeout (MAX_POLL_TIMEOUT_
  SECONDS). At most `max_watches` of either are open at once (503 beyond).
- Every answer to a write (POST/PUT/DELETE on /db and /lease, a lease's keepalive, and the admin requests: join,
  removal, transfer) that is not a success carries X-Raft-Outcome (issue 15): `not-applied` when the write surely
  took no effect (refused before it was proposed, a proposal the core dropped, an entry overwritten by another
  leader, bad input, a redirect; a keepalive that failed, which extends nothing before its read round) and may be
  retried, `unknown` when it was (or may have been) proposed and its fate is not known: never retry that
  blindly. The mapping is in _ANSWERS; an answer of 500 or more that names no outcome says `unknown`, one under 500
  says `not-applied` (`_serving`). A -forward follower passes the leader's on.
- A request of another method than GET, HEAD or OPTIONS that a page of another site made a browser send is
  refused 403 (`_serving`: Sec-Fetch-Site cross-site or same-site, or an Origin whose host:port is not the
  request's Host), with or without a secret: a page an operator opens cannot write to a node on localhost (CSRF).
  curl, the Python client, raftdzmqctl and a follower's forward send no Origin; the dashboard is same-origin.
  A page whose own name was rebound to the node's address is same-origin too: the edge refuses its requests
  before any route, by their Host (raftlib.server.hosts).
- GET /livez and GET /readyz (raftlib.server.health) need no secret and are never forwarded; /livez reads only the
  runtime's status, /readyz too and then, once its checks pass, asks one linearizable read (READY_READ_SECONDS).
- The API of feature level 2 (?prev_index=N, DELETE /db/?prefix=P, POST /txn: issue 14) is answered 409 while
  the cluster's feature level (the store's, replicated) is below 2: an older release would apply its commands as
  nothing and the nodes would diverge. A request is checked whole (400 naming the problem) before it is proposed.
- Leases (issue 14 part 2; level 2 too): every lease route is the leader's (a follower answers 307, or forwards
  with -forward, as for writes), since only the leader knows when a lease expires (raftlib.server.leases). A
  lease id is the decimal text of the grant's log index. A TTL is whole seconds, at most MAX_TTL_SECONDS; one
  below `min_ttl_seconds` (1.5 election timeouts, at least 1 s, as etcd's minimum) is raised to it and the answer
  says the TTL granted. A keepalive confirms leadership with a read round (no log entry) after noting when it
  arrived, then extends the lease (LeaseKeeper.keepalive); 404 once the lease is gone or being expired (the text
  says which). POST /lease/keepalive keeps up to MAX_KEEPALIVE_IDS leases alive behind one read round, answering
  each as its own keepalive would (an error per id, never a 404 for the whole). POST /db/KEY?ttl=S answers the TTL granted in X-Raft-Lease-TTL; ?lease=0 is no lease (etcd).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import bottle
import gevent
import gevent.lock
import prometheus_client as prom

from raftlib.core import NodeStatus, NotLeader, ProposalDropped, UncommittedBoundExceeded
from raftlib.events import EventRing
from raftlib.messages import ConfChange, ConfChangeKind, Member, Membership, Role
from raftlib.runtime import Backup, BackupBusy, BackupFailed, EntryLost, NotRunning, RuntimeStatus, Stopped, Timeout
from raftlib.storage_errors import DiskFull

from .admin import (NODE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, AdminGuard, answer_headers, keys_request_body, valid_nonce,
                    valid_public_key, wire_target)
from .edge import EOF_PROBE_SECONDS, HALF_CLOSE_PROBES, WRITE_METHODS, RateLimitedLog, Stream, waiting_on_its_own
from .health import READY_READ_SECONDS, liveness, readiness, report
from .metrics import Metrics
from .nodestart import name_of
from .leases import LeaseKeeper
from .store import (ADMIN_CLAIM, COMPARE_AND_SET, CREATE, DELETE, DELETE_IF_INDEX, DELETE_PREFIX, FEATURE_LEVEL,
                    LEASE_GRANT, LEASE_REVOKE, MAX_DELETE_KEYS_PER_ENTRY, MAX_KEYS_PER_LEASE, MAX_LEASES,
                    MAX_TTL_SECONDS, MAX_TXN_OPS, PUT_WITH_TTL, SET, SET_IF_INDEX, SET_WITH_LEASE, TXN, KeyValueStore,
                    NoLease, TxnResult, command, txn_problem)
from .watch import MAX_STREAM_BYTES_PER_READ, Behind, Filter, WatchHub, sse_error

log = logging.getLogger("raftdzmq.api")

NOT_LEADER = "raft.Server: Not current leader"  # the Go original's text for a write sent to a follower
FORWARDED_HEADER = "X-Raftdzmq-Forwarded"  # set by a -forward follower: the leader answers it, never forwards it
MAX_KEY_BYTES = 4096
KEEPALIVE_SECONDS = 5.0  # a watch stream with nothing to send writes a comment this often (and so finds a dead peer)
MAX_WATCHES = 10_000  # watches (streams and long polls) open at once on one node; 503 beyond
DEFAULT_POLL_TIMEOUT_SECONDS = 30.0
MAX_POLL_TIMEOUT_SECONDS = 60.0
MAX_POLL_BYTES = 4 << 20  # event JSON in one long poll's answer (a group goes whole): the client goes on from its position
WATCH_POSITION_HEADER = "X-Raft-Watch-Position"  # a long poll's next from (watch.py's positions)
OUTCOME_HEADER = "X-Raft-Outcome"  # on every failed write's answer (the module's rules)
NOT_APPLIED, UNKNOWN = "not-applied", "unknown"
WRITE_OPERATIONS = frozenset(("write", "keepalive", "join", "removal", "transfer"))  # the operations whose answers name an outcome


class NodeView(Protocol):
    """The fields of the node (raftlib.core.RaftNode) the busiest routes read directly."""

    @property
    def node_id(self) -> str: ...

    @property
    def role(self) -> Role: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def last_applied(self) -> int: ...

    @property
    def membership(self) -> Membership: ...

    @property
    def removed(self) -> tuple[str | None, int] | None: ...


class Raft(Protocol):
    """What the routes need of raftlib.runtime.Runtime (its docstrings give the contracts)."""

    @property
    def node(self) -> NodeView: ...

    @property
    def restoring_snapshot(self) -> bool: ...

    @property
    def events(self) -> EventRing: ...

    def status(self) -> RuntimeStatus: ...

    def propose(self, command: bytes, timeout_seconds: float): ...

    def read(self, timeout_seconds: float, lease: bool = False) -> tuple[int, int]: ...

    def wait_applied(self, index: int, timeout_seconds: float) -> int: ...

    def change_membership(self, change: ConfChange, timeout_seconds: float): ...

    def transfer_leadership(self, target: str, timeout_seconds: float) -> None: ...

    def backup(self, folder: str, timeout_seconds: float) -> Backup: ...


@dataclass(slots=True)
class Api:
    """What the routes share. `guard` is None without a cluster secret (admin requests are not signed then);
    `connect` opens the connection a -forward follower passes a request on with (http.client's, unless a test
    gives another)."""

    runtime: Raft
    store: KeyValueStore
    metrics: Metrics
    write_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 5.0
    forward: bool = False
    guard: AdminGuard | None = None
    max_members: int = 64
    # The newest committed configuration in this node's log and its index (its snapshot's when the log has none
    # committed; None when there is none): GET /cluster/keys answers with it.
    committed_configuration: Callable[[], tuple[int, Membership] | None] = lambda: None
    connect: Callable[..., http.client.HTTPConnection] = http.client.HTTPConnection
    admin_refusals: RateLimitedLog = field(default_factory=lambda: RateLimitedLog("refused admin requests", log))
    # This node's feature level (store.FEATURE_LEVEL; lower only in tests: node.TEST_FEATURE_LEVEL_ENV), and why
    # the cluster's is not raised yet (the node's FeatureLevelRaiser knows which members lag).
    feature_level: int = FEATURE_LEVEL
    upgrade_reason: Callable[[], str] = lambda: "the cluster's feature level is being raised; retry shortly"
    # Held by a join while its configuration change is made, and by the leader's FeatureLevelRaiser from its look
    # at the configuration (which must still be the one, by term and configuration index, whose members it asked
    # without the lock) until its SET_FEATURE_LEVEL applied: a node of an older release cannot join between.
    membership_lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    # The history GET /watch reads (the node gives the store's on_event to it), and the most watches open at once.
    watch_hub: WatchHub = field(default_factory=WatchHub)
    max_watches: int = MAX_WATCHES
    # The leader's LeaseKeeper, in step with the node's role and term; None while this node does not lead.
    lease_keeper: Callable[[], LeaseKeeper | None] = lambda: None
    min_ttl_seconds: int = 1
    # GET /snapshot: the folder its file is written in (the data dir: start-up deletes a *.tmp left by a crash),
    # and how long the whole backup may take to write (the runtime's bound on a snapshot child).
    backup_folder: str = "."
    backup_timeout_seconds: float = 600.0
    # The members this node removed by -force-new-cluster (node.json's "fenced"): a join under their names is
    # refused (review of ops, finding 7).
    fenced: Callable[[], frozenset[str]] = frozenset
    # What the dashboard (raftlib.server.dashboard) keeps between requests: its gather of the members' numbers.
    dashboard_state: dict[str, object] = field(default_factory=dict)
    # GET /status's data_size: the bytes the node's state takes on disk (DiskStorage.disk_bytes); None: unknown.
    data_size: Callable[[], int | None] = lambda: None


# ---- failures and their answers -------------------------------------------------------------------------------


class Forbidden(Exception):
    """An admin request refused (403): not signed with the cluster secret, or a replay."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(reason)
        self.what, self.reason = what, reason


class Unconfirmed(Exception):
    """The claim of a signed admin request (store.AdminClaims) did not commit: its outcome is unknown, and the
    request must be signed again (a new signature) to be tried again."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(f"{cause}")
        self.what, self.cause = what, cause


class NotApplied(Exception):
    """?min_index=N: this node did not apply index N within the read timeout."""

    def __init__(self, index: int) -> None:
        super().__init__(f"index {index} not applied")
        self.index = index


# By operation, then by exception type: (status, text; {e} is the exception, {write}/{read} the timeouts; for
# writes the outcome the metrics count; the X-Raft-Outcome of the answer, None for what is not a write).
# NotLeader, Forbidden, Unconfirmed and NotApplied are answered alike for every operation, in failure_answer.
# NotRunning before Stopped: the node was not running when the request came, so nothing was queued; a Stopped
# raised to a queued request may come after its entry was appended, or committed. EntryLost is certain: another
# entry committed at its index (runtime._apply). A Timeout may come while the proposal still waits in the inbox,
# which proposes it later all the same: unknown.
_NOT_CONFIRMED = "{operation} not confirmed: {e}"
_ANSWERS: dict[str, dict[type, tuple[int, str, str | None, str | None]]] = {
    "write": {
        UncommittedBoundExceeded: (503, "write refused for now: {e}; retry", "refused_uncommitted", NOT_APPLIED),
        ProposalDropped: (503, "write refused for now: {e}; retry", "refused", NOT_APPLIED),
        EntryLost: (503, "write lost: leadership changed before it committed; it was not applied", "lost",
                    NOT_APPLIED),
        Timeout: (503, "write not confirmed within {write:g}s; its outcome is unknown", "unknown", UNKNOWN),
        DiskFull: (507, "write refused: {e}; it was not applied", "refused", NOT_APPLIED),
        NotRunning: (503, "{e}", None, NOT_APPLIED),
        Stopped: (503, "{e}", None, UNKNOWN),
    },
    "read": {
        Timeout: (503, "could not confirm a linearizable read within {read:g}s", None, None),
        Stopped: (503, "{e}", None, None),
    },
    "join": {
        ProposalDropped: (503, "join not possible now: {e}", None, NOT_APPLIED),
        Timeout: (503, _NOT_CONFIRMED, None, UNKNOWN),
        EntryLost: (503, _NOT_CONFIRMED, None, NOT_APPLIED),
        NotRunning: (503, _NOT_CONFIRMED, None, NOT_APPLIED),
        Stopped: (503, _NOT_CONFIRMED, None, UNKNOWN),
        ValueError: (400, "{e}", None, NOT_APPLIED),
    },
    "removal": {
        ProposalDropped: (503, _NOT_CONFIRMED, None, NOT_APPLIED),
        Timeout: (503, _NOT_CONFIRMED, None, UNKNOWN),
        EntryLost: (503, _NOT_CONFIRMED, None, NOT_APPLIED),
        NotRunning: (503, _NOT_CONFIRMED, None, NOT_APPLIED),
        Stopped: (503, _NOT_CONFIRMED, None, UNKNOWN),
        ValueError: (400, "{e}", None, NOT_APPLIED),
    },
    "keys": {},
    "lease": {
        Timeout: (503, "lease request not confirmed within {write:g}s; retry", None, None),
        Stopped: (503, "{e}", None, None),
    },
    "keepalive": {
        # A keepalive extends the lease only after its read round confirmed leadership (leases' rules): one that
        # failed extended nothing, and retrying it is always safe.
        Timeout: (503, "keepalive not confirmed within {write:g}s; the lease was not extended; retry", None,
                  NOT_APPLIED),
        Stopped: (503, "{e}; the lease was not extended", None, NOT_APPLIED),
    },
    "backup": {
        Timeout: (503, "{e}", None, None),
        Stopped: (503, "{e}", None, None),
        BackupBusy: (503, "{e}", None, None),
        BackupFailed: (503, "{e}", None, None),
    },
    "transfer": {
        # A transfer is no log entry, but its effect (another leader) is the same kind of fact: a timeout after
        # TimeoutNow went out may still end with the target leading. One that timed out before the runtime took
        # it is never started (Runtime.transfer_leadership: ProposalDropped). Its signature, if any, was claimed
        # before the transfer was queued: a retry must be signed again (review of rebind, F3).
        ProposalDropped: (503, "{e}; sign it again to retry", None, NOT_APPLIED),
        Timeout: (503, _NOT_CONFIRMED, None, UNKNOWN),
        NotRunning: (503, _NOT_CONFIRMED, None, NOT_APPLIED),
        Stopped: (503, _NOT_CONFIRMED, None, UNKNOWN),
        ValueError: (400, "{e}", None, NOT_APPLIED),
    },
}
_CAUGHT = (NotLeader, Forbidden, Unconfirmed, NotApplied, ProposalDropped, EntryLost, Timeout, DiskFull, Stopped,
           ValueError, BackupBusy, BackupFailed)


def failure_answer(api: Api, operation: str, e: Exception) -> bottle.HTTPResponse:
    """The answer to `e`, raised while serving `operation` ("write", "read", "join", "removal", "transfer").
    Raises `e` again when it is not one this API answers (Bottle then answers 500)."""
    request = bottle.request
    match e:
        case Forbidden():
            api.admin_refusals.log(logging.WARNING, "refused a %s from %s: %s", e.what, request.remote_addr, e.reason)
            return text(403, f"{e.what} refused: {e.reason}")
        case Unconfirmed():
            # Whatever became of the claim, the request's own change was never proposed: not applied.
            return text(503, f"{e.what} not confirmed ({e.cause}); sign it again to retry",
                        **{OUTCOME_HEADER: NOT_APPLIED})
        case NotApplied():
            return text(503, f"index {e.index} not applied here within {api.read_timeout_seconds:g}s")
        case NotLeader() if operation in ("read", "backup"):
            removed = removed_text(api.runtime.node.removed)
            return text(410, removed) if removed else text(
                503, "no leader is known right now; the read cannot be confirmed")
        case NotLeader():
            if operation == "write":
                api.metrics.writes.inc("redirected")
            return redirect_to_leader(api)
    for kind in type(e).__mro__:
        answer = _ANSWERS.get(operation, {}).get(kind)
        if answer is not None:
            status, template, outcome, raft_outcome = answer
            if outcome is not None:
                api.metrics.writes.inc(outcome)
            headers = {OUTCOME_HEADER: raft_outcome} if raft_outcome is not None else {}
            return text(status, template.format(e=e, operation=operation, write=api.write_timeout_seconds,
                                                read=api.read_timeout_seconds), **headers)
    raise e


def text(status: int, message: str, **headers: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(message + "\n", status, {"Content-Type": "text/plain; charset=utf-8", **headers})


def json_answer(body: object, **headers: str) -> bottle.HTTPResponse:
    """One line of JSON and a newline (json's C encoder: with `indent` it would fall back to the Python one)."""
    return bottle.HTTPResponse(json.dumps(body) + "\n", 200, {"Content-Type": "application/json", **headers})


def removed_text(removed: tuple[str | None, int] | None) -> str | None:
    """Why this node serves nothing, when a member told it that it was removed (RaftNode.removed); else None."""
    if removed is None:
        return None
    leader_id, index = removed
    return f"this node was removed from the cluster ({f'by {leader_id} ' if leader_id else ''}at or before index {index})"


def leader_http(membership: Membership, leader_id: str | None) -> str | None:
    member = membership.member(leader_id) if leader_id is not None else None
    return member.http_address if member else None


def redirect_to_leader(api: Api) -> bottle.HTTPResponse:
    """307 to the leader with the request target exactly as sent: rebuilding it from the decoded path would change
    the key (%2541 -> %41, %3F -> a query, /../ resolved) and break on a space or non-ASCII. With -forward, the
    request is passed on instead (one hop only). 410 on a removed node, 503 when no leader is known."""
    node = api.runtime.node
    leader = leader_http(node.membership, node.leader_id)
    if leader is None:
        removed = removed_text(node.removed)
        return text(410, removed) if removed else text(503, "no leader is known right now; retry shortly",
                                                       **{OUTCOME_HEADER: NOT_APPLIED})
    if api.forward and bottle.request.get_header(FORWARDED_HEADER) is None:
        return forward_to(api, leader)
    return text(307, NOT_LEADER, Location=f"http://{leader}{wire_target(bottle.request.environ['REQUEST_URI'])}")


# The leader's answer headers a forwarding follower hands back: the signature of a signed answer (a join's) too,
# without which the joining node must refuse the answer.
_FORWARDED_ANSWER_HEADERS = frozenset(("content-type", "x-raft-index", "x-raft-lease", "x-raft-lease-ttl", "location",
                                       OUTCOME_HEADER.lower(), TIMESTAMP_HEADER.lower(), SIGNATURE_HEADER.lower()))


def forward_to(api: Api, leader: str) -> bottle.HTTPResponse:
    """-forward: pass this request on to the leader and hand back its answer (its X-Raft-Outcome too). The target
    goes as sent, and with it the admin signature headers, which cover it. A request that could not be sent whole
    (no connection, a reset while sending) was not applied: the leader's edge runs nothing before a whole request
    has arrived. One sent whole but not answered may have been."""
    req = bottle.request
    host, port = leader.rsplit(":", 1)
    headers = {FORWARDED_HEADER: api.runtime.node.node_id, "Content-Type": req.content_type or ""}
    for name in (TIMESTAMP_HEADER, SIGNATURE_HEADER):
        if req.get_header(name) is not None:
            headers[name] = req.get_header(name)
    conn = api.connect(host, int(port), timeout=api.write_timeout_seconds + 1)
    try:
        try:
            conn.request(req.method, wire_target(req.environ["REQUEST_URI"]), body=read_body(), headers=headers)
        except (OSError, http.client.HTTPException) as e:
            return text(503, f"could not forward to the leader at {leader}: {e}; not applied",
                        **{OUTCOME_HEADER: NOT_APPLIED})
        try:
            resp = conn.getresponse()
            keep = {k: v for k, v in resp.getheaders() if k.lower() in _FORWARDED_ANSWER_HEADERS}
            return bottle.HTTPResponse(resp.read(), resp.status, keep)
        except (OSError, http.client.HTTPException) as e:
            return text(503, f"no answer from the leader at {leader}: {e}; outcome unknown",
                        **{OUTCOME_HEADER: UNKNOWN})
    finally:
        conn.close()


# ---- helpers of the routes ------------------------------------------------------------------------------------


def read_body() -> bytes:
    return bottle.request.environ["raftdzmq.body"]


def check_key(key: str) -> str:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise text(400, f"key must be 1 to {MAX_KEY_BYTES} bytes")
    return key


def require_leader(api: Api) -> None:
    node = api.runtime.node
    if node.role is not Role.LEADER:
        raise NotLeader(node.leader_id)


def check_signature(api: Api, what: str) -> None:
    """With a cluster secret: Forbidden unless this admin request is signed with it, recently (AdminGuard)."""
    if api.guard is None:
        return
    req = bottle.request
    reason = api.guard.verify(req.method, req.environ["REQUEST_URI"], read_body(), req.get_header(TIMESTAMP_HEADER),
                              req.get_header(SIGNATURE_HEADER))
    if reason is not None:
        raise Forbidden(what, reason)


def claim_signature(api: Api, what: str) -> None:
    """On the leader, just before acting: refuse a signature already acted on (a replay), here (AdminGuard: no log
    entry for a replay to this leader) or by any leader (store.AdminClaims, through the log)."""
    if api.guard is None:
        return
    req = bottle.request
    signature = req.get_header(SIGNATURE_HEADER)
    reason = api.guard.claim(signature)
    if reason is None:
        claim = command(ADMIN_CLAIM, signature, b"", [float(req.get_header(TIMESTAMP_HEADER)), time.time()])
        try:
            _, result = api.runtime.propose(claim, api.write_timeout_seconds)
        except (ProposalDropped, EntryLost, Timeout, DiskFull, Stopped) as e:
            raise Unconfirmed(what, e) from None
        if result == "used":
            reason = "this signed request was already used, on another leader (a replay); sign it again"
        elif result == "expired":
            reason = ("this signed request is older than the cluster remembers (a leader's clock ran ahead?); "
                      "sign it again")
    if reason is not None:
        raise Forbidden(what, reason)


def propose(api: Api, cmd: bytes) -> tuple[int, object]:
    """A write: (index, result) once committed and applied here; failures go to failure_answer."""
    node = api.runtime.node
    if node.role is not Role.LEADER:  # require_leader, inline on the busiest path
        raise NotLeader(node.leader_id)
    t0 = time.perf_counter()
    result = api.runtime.propose(cmd, api.write_timeout_seconds)
    api.metrics.write_seconds.observe(time.perf_counter() - t0)
    api.metrics.writes.inc("committed")
    return result


def wait_consistent(api: Api) -> None:
    """Wait until this node may answer a read at the consistency asked for (thesis §6.4): ?min_index=N first
    waits for index N to be applied here; then linearizable (ReadIndex), lease, or stale (no wait)."""
    q = bottle.request.query
    consistency = q.get("consistency", "linearizable")
    if "min_index" in q:
        try:
            min_index = int(q.min_index)
        except ValueError:
            raise text(400, "min_index must be an integer") from None
        try:
            api.runtime.wait_applied(min_index, api.read_timeout_seconds)
        except Timeout:
            raise NotApplied(min_index) from None
    if consistency == "stale":
        api.metrics.reads.inc("stale")
        return
    if consistency not in ("linearizable", "lease"):
        raise text(400, "consistency must be linearizable, lease or stale")
    api.metrics.reads.inc(consistency)
    t0 = time.perf_counter()
    deadline = time.monotonic() + api.read_timeout_seconds
    while True:
        try:
            api.runtime.read(max(0.01, deadline - time.monotonic()), lease=consistency == "lease")
            break
        except NotLeader:
            # Right after a start or an election no leader is known yet: wait for one, within the bound.
            if api.runtime.node.removed is not None or time.monotonic() >= deadline:
                raise
            gevent.sleep(0.02)
    api.metrics.read_index_seconds.observe(time.perf_counter() - t0)


def read_headers(api: Api) -> dict[str, str]:
    node = api.runtime.node
    return {"X-Raft-Applied-Index": str(node.last_applied), "X-Raft-Leader": node.leader_id or ""}


def members(node: NodeStatus) -> list[dict]:
    """The members as GET /cluster lists them; match indexes only while this node leads (its own: its last index)."""
    leading = node.role is Role.LEADER
    out = []
    for m in node.membership.members:
        match_index = None
        if leading:
            progress = node.progress.get(m.node_id)
            match_index = node.last_index if m.node_id == node.node_id else progress and progress.match_index
        out.append({"id": m.node_id, "raft_address": m.raft_address, "http_address": m.http_address,
                    "role": "voter" if m.node_id in node.membership.voters else "learner",
                    "match_index": match_index, **({"public_key": m.public_key} if m.public_key else {})})
    return out


def require_level_2(api: Api) -> None:
    """409 unless the cluster's feature level (replicated) is 2 or more (the module's rules). Asked BEFORE
    require_leader, on followers too (review of coord1, S2): a follower would 307 or -forward the request to a
    leader that may run an older release, which ignores ?prev_index (an unconditional write) and knows no
    ?prefix nor /txn. A follower at level 2 has a leader at level 2 (the level is in the log and never goes down;
    an older binary stops at start on the V3 snapshot the raise takes: store, "Downgrades")."""
    if api.runtime.restoring_snapshot:
        # The store holds the old state until the snapshot is in, its level too (final review, F2): not a 409.
        raise text(503, "this node is restoring a snapshot; retry",
                   **{"X-Raft-Outcome": "not-applied"})
    if api.store.feature_level < 2:
        raise text(409, api.upgrade_reason())


def prev_index(api: Api) -> int:
    """?prev_index=N (an integer >= 0; 0: the key must be missing), on a leader of a cluster of level 2."""
    digits = bottle.request.query["prev_index"]
    # Digits only: int() would take "+14", "1_4", " 14" and "-0" (review of coord1, Q2).
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
        raise text(400, "prev_index must be an integer >= 0 (decimal digits only)")
    n = int(digits)
    require_level_2(api)  # before the leader: an old leader would take a new request as an old one (S2)
    require_leader(api)
    return n


class BadTxn(Exception):
    """A transaction's body that is not one (400 with this text)."""


_TXN_FIELDS = {"compare": {"key", "target", "op", "value", "value_base64"},
               "put": {"op", "key", "value", "value_base64", "lease"}, "delete": {"op", "key", "prefix"},
               "get": {"op", "key", "prefix"}}


def _utf8(s: str, where: str, name: str) -> bytes:
    """`s` as UTF-8; BadTxn for a lone surrogate (JSON's "\ud800": no UTF-8 for it, review of coord1, Q1)."""
    try:
        return s.encode()
    except UnicodeEncodeError:
        raise BadTxn(f"{where}: {name} is not valid Unicode (a lone surrogate)") from None


def _txn_key(item: dict, name: str, where: str) -> str:
    key = item[name]
    if not isinstance(key, str) or not key or len(_utf8(key, where, name)) > MAX_KEY_BYTES:
        raise BadTxn(f"{where}: {name} must be a string of 1 to {MAX_KEY_BYTES} bytes")
    return key


def _txn_value(item: dict, where: str) -> bytes:
    """A JSON item's value: "value" (text, sent as UTF-8) or "value_base64"; never both."""
    if "value" in item and "value_base64" in item:
        raise BadTxn(f"{where}: value and value_base64 both given; give one")
    if "value_base64" in item:
        try:
            if not isinstance(item["value_base64"], str):
                raise ValueError
            return base64.b64decode(item["value_base64"], validate=True)
        except (ValueError, binascii.Error):
            raise BadTxn(f"{where}: value_base64 is not base64") from None
    if not isinstance(item.get("value"), str):
        raise BadTxn(f"{where}: needs a value (text) or value_base64")
    return _utf8(item["value"], where, "value")


def _txn_lease(value: object, where: str) -> int:
    """A lease id in a JSON transaction: its text as answers give it ("42"), or the number; 0 for no lease."""
    if type(value) is str and value.isascii() and value.isdigit() and len(value) < 20:
        value = int(value)
    if type(value) is not int or value < 0:
        raise BadTxn(f"{where}: a lease is a lease id (as POST /lease answers it) or 0")
    return value


def _plain_put(item: object) -> list | None:
    """The common op, {"op": "put", "key", "value"} with an ASCII key and a text value, as the store's TXN carries
    it; None for anything else (the general path, `_txn_item`, takes it and names its problem)."""
    if type(item) is dict and len(item) == 3 and item.get("op") == "put":
        key, value = item.get("key"), item.get("value")
        if type(key) is str and type(value) is str and key and key.isascii() and len(key) <= MAX_KEY_BYTES:
            try:
                return ["put", key, value.encode()]
            except UnicodeEncodeError:
                pass  # a lone surrogate
    return None


def _txn_item(item: object, kind: str, where: str) -> list:
    """One compare or op of a JSON transaction as the store's TXN carries it (store.txn_problem)."""
    if not isinstance(item, dict):
        raise BadTxn(f"{where}: want a JSON object")
    if kind != "compare":
        op = item.get("op")
        if op not in ("put", "delete", "get"):
            raise BadTxn(f"{where}: unknown op {op!r} (want put, delete or get)")
        kind = op
    unknown = sorted(set(item) - _TXN_FIELDS[kind])
    if unknown:
        raise BadTxn(f"{where}: unknown field {unknown[0]!r}")
    if kind == "compare":
        target, operand = item.get("target"), item.get("value")
        if target == "value":
            operand = _txn_value(item, where)
        elif target == "lease":
            operand = _txn_lease(operand, where)
        elif target in ("modify_index", "create_index") and (type(operand) is not int or operand < 0):
            raise BadTxn(f"{where}: a {target} compare needs an integer >= 0 as value")
        elif target == "exists" and type(operand) is not bool:
            raise BadTxn(f"{where}: an exists compare needs true or false as value")
        if "key" not in item:
            raise BadTxn(f"{where}: missing key")
        return [_txn_key(item, "key", where), target, item.get("op"), operand]
    if kind == "put":
        if "key" not in item:
            raise BadTxn(f"{where}: missing key")
        put = ["put", _txn_key(item, "key", where), _txn_value(item, where)]
        lease_id = _txn_lease(item.get("lease", 0), where)
        return [*put, lease_id] if lease_id else put
    if ("key" in item) == ("prefix" in item):
        raise BadTxn(f"{where}: a {kind} names a key or a prefix (one of them)")
    name = "key" if "key" in item else "prefix"
    return [kind, _txn_key(item, name, where), name == "prefix"]


def parse_txn(raw: bytes) -> list:
    """POST /txn's JSON body as the store's TXN carries it; BadTxn naming the first problem."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadTxn("the body is not JSON") from None
    except RecursionError:  # a body of 1 MiB of "[" (review of coord1, Q1)
        raise BadTxn("the body nests too deeply") from None
    if not isinstance(body, dict):
        raise BadTxn('want a JSON object {"compare": [...], "success": [...], "failure": [...]}')
    unknown = sorted(set(body) - {"compare", "success", "failure"})
    if unknown:
        raise BadTxn(f"unknown field {unknown[0]!r} (want compare, success, failure)")
    parts = []
    for name in ("compare", "success", "failure"):
        part = body.get(name, [])
        if not isinstance(part, list):
            raise BadTxn(f"{name} must be a list")
        if len(part) > MAX_TXN_OPS:
            raise BadTxn(f"{name} has {len(part)} items: at most {MAX_TXN_OPS}")
        kind = "compare" if name == "compare" else "op"
        items = []
        for i, item in enumerate(part):
            found = None if kind == "compare" else _plain_put(item)  # the common op: no `where` to format
            items.append(found if found is not None else _txn_item(item, kind, f"{name}[{i}]"))
        parts.append(items)
    problem = txn_problem(parts)  # the store's own check: unknown targets and compare ops, and all the rest
    if problem is not None:
        raise BadTxn(problem)
    return parts


# A str as json.dumps writes it (ensure_ascii): json's own C function, without a dumps call around it.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _json_value(value: bytes) -> dict[str, str]:
    """`value` as answers carry it: "value" when it is UTF-8, else "value_base64"."""
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode()}


def _txn_answer(result: tuple) -> dict:
    """One op's result as JSON; "more": true when a bound of the store (MAX_DELETE_KEYS_PER_ENTRY,
    MAX_TXN_GET_KEYS, MAX_TXN_GET_BYTES) stopped it before the end of its prefix (absent otherwise)."""
    kind, detail, *more = result
    if kind == "put":
        return {"op": "put", "key": detail}
    if kind == "delete":
        return {"op": "delete", "deleted": detail, **({"more": True} if more[0] else {})}
    return {"op": "get", "kvs": [{"key": k, **_json_value(v), "create_index": c, "modify_index": m}
                                 for k, v, c, m in detail], **({"more": True} if more[0] else {})}


def txn_answer_json(result: TxnResult, index: int) -> str:
    """POST /txn's answer, the same text as json_answer of {"succeeded", "index", "results": [_txn_answer(r) ...]}
    (tests/test_http_api.py compares them), with each put's result (most of them) written as text rather than
    built as a dict and encoded: a 10-put txn's answer is ~4x cheaper."""
    results = ", ".join(f'{{"op": "put", "key": {_json_string(r[1])}}}' if r[0] == "put" else json.dumps(_txn_answer(r))
                        for r in result.results)
    return f'{{"succeeded": {"true" if result.succeeded else "false"}, "index": {index}, "results": [{results}]}}\n'


def precondition_failed(api: Api, key: str, index: int) -> bottle.HTTPResponse:
    """412, with the key's modify index as this node applied it (0 when missing) from feature level 2 on, so that a
    compare-and-set loop needs no GET (review of coord1, Q3). It is as of this answer: a later write may change it."""
    headers = {"X-Raft-Index": str(index)}
    if api.store.feature_level >= 2:
        record = api.store.record(key)
        headers["X-Raft-Modify-Index"] = str(0 if record is None else record[2])
    return text(412, "precondition failed", **headers)


# ---- the routes -----------------------------------------------------------------------------------------------


def set_key(api: Api, key: str) -> bottle.HTTPResponse | str:
    key = check_key(key)
    value = read_body()
    q = bottle.request.query if bottle.request.environ.get("QUERY_STRING") else {}
    lease_id = ttl = None
    # ?lease=0 is no lease, as in etcd and a txn's put: a put without a lease takes the key off its lease.
    with_lease = "lease" in q and q["lease"] != "0"
    if with_lease or "ttl" in q:
        if sum((with_lease, *(name in q for name in ("ttl", "prev_index", "prev_value", "prev_exist")))) > 1:
            raise text(400, "lease and ttl go alone: not together nor with prev_index, prev_value or prev_exist "
                       "(POST /txn compares and puts with a lease in one step)")
        require_leader(api)
        require_level_2(api)
        if "ttl" in q:
            ttl = ttl_seconds(api)
            cmd = command(PUT_WITH_TTL, key, value, ttl)
        else:
            lease_id = parse_lease_id(q["lease"])
            cmd = command(SET_WITH_LEASE, key, value, lease_id)
    elif "prev_index" in q:
        if "prev_value" in q or "prev_exist" in q:
            raise text(400, "prev_index goes alone: not with prev_value or prev_exist")
        cmd = command(SET_IF_INDEX, key, value, prev_index(api))
    elif "prev_value" in q:
        # The percent-decoded bytes as they are (Bottle's q.prev_value turns bytes that are not UTF-8 into "",
        # which would compare against an empty value).
        cmd = command(COMPARE_AND_SET, key, value, q["prev_value"].encode("latin-1"))
    elif q.get("prev_exist") == "false":
        cmd = command(CREATE, key, value)
    else:
        cmd = command(SET, key, value)
    index, result = propose(api, cmd)
    if result == "failed":
        return precondition_failed(api, key, index)
    if isinstance(result, NoLease):
        return text(404, f"lease {result.lease_id} not found", **{"X-Raft-Index": str(index)})
    if result == "full":
        return text(409, f"too many leases: at most {MAX_LEASES}; revoke some", **{"X-Raft-Index": str(index)})
    if result == "lease full":
        return text(409, f"lease {lease_id} holds {MAX_KEYS_PER_LEASE} keys, the most a lease holds",
                    **{"X-Raft-Index": str(index)})
    bottle.response.set_header("X-Raft-Index", str(index))
    if ttl is not None:
        bottle.response.set_header("X-Raft-Lease", str(index))  # the key's own lease: the entry's index
        bottle.response.set_header("X-Raft-Lease-TTL", str(ttl))  # as granted: raised to the minimum, maybe
    return ""


def delete_key(api: Api, key: str) -> bottle.HTTPResponse:
    key = check_key(key)
    q = bottle.request.query if bottle.request.environ.get("QUERY_STRING") else {}
    cmd = command(DELETE_IF_INDEX, key, b"", prev_index(api)) if "prev_index" in q else command(DELETE, key)
    index, result = propose(api, cmd)
    if result == "missing":
        return text(404, f"no such key: {key}", **{"X-Raft-Index": str(index)})
    if result == "failed":
        return precondition_failed(api, key, index)
    return bottle.HTTPResponse("", 200, {"X-Raft-Index": str(index)})


def get_key(api: Api, key: str) -> bottle.HTTPResponse:
    key = check_key(key)
    wait_consistent(api)
    record = api.store.record(key)
    if record is None:
        return text(404, f"no such key: {key}", **read_headers(api))
    value, create_index, modify_index = record
    headers = {"Content-Type": "application/octet-stream", **read_headers(api)}
    if api.store.feature_level >= 2:  # below it no node exposes indices (store: "Indices")
        headers["X-Raft-Create-Index"], headers["X-Raft-Modify-Index"] = str(create_index), str(modify_index)
    return bottle.HTTPResponse(value, 200, headers)


def list_keys(api: Api) -> bottle.HTTPResponse:
    q = bottle.request.query
    try:  # from UTF-8, as keys are (get() hands back the bytes as latin-1, which matches no non-ASCII key)
        prefix, after = (q.get(name, "").encode("latin-1").decode("utf-8") for name in ("prefix", "after"))
    except UnicodeError:
        raise text(400, "prefix and after must be UTF-8") from None
    try:
        limit = min(max(int(q.get("limit", "1000")), 1), 10000)
    except ValueError:
        raise text(400, "limit must be an integer") from None
    wait_consistent(api)
    page, more = api.store.page(prefix, after, limit)
    return json_answer({"keys": page, "next": page[-1] if more else None}, **read_headers(api))


def delete_prefix(api: Api) -> bottle.HTTPResponse:
    """DELETE /db/?prefix=P: every key that starts with P; {"deleted": n, "index": i}, i the last entry's. Up to
    MAX_DELETE_KEYS_PER_ENTRY keys in one entry (atomic), a longer range in several, one after the other; when
    keys keep coming past the write timeout, the answer says "more": true."""
    q = bottle.request.query
    try:
        prefix = q.get("prefix", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise text(400, "prefix must be UTF-8") from None
    if not prefix or len(prefix.encode()) > MAX_KEY_BYTES:
        raise text(400, f"DELETE /db/ needs ?prefix= of 1 to {MAX_KEY_BYTES} bytes (the keys it deletes start with it)")
    require_level_2(api)  # before the leader: an old leader would take a new request as an old one (S2)
    require_leader(api)
    # One entry deletes at most MAX_DELETE_KEYS_PER_ENTRY keys (store: each node's loop applies it): propose
    # again until one deletes fewer, within the write timeout. Each entry is atomic, the range as a whole is not.
    deadline = time.monotonic() + api.write_timeout_seconds
    deleted = 0
    while True:
        index, result = propose(api, command(DELETE_PREFIX, prefix))
        deleted += result if type(result) is int else 0
        if result != MAX_DELETE_KEYS_PER_ENTRY:
            return json_answer({"deleted": deleted, "index": index}, **{"X-Raft-Index": str(index)})
        if time.monotonic() > deadline:  # keys keep coming: say how far it got
            return json_answer({"deleted": deleted, "index": index, "more": True}, **{"X-Raft-Index": str(index)})


def post_txn(api: Api) -> bottle.HTTPResponse | str:
    """POST /txn: compares, then the success or the failure ops, in one entry (store: TXN)."""
    try:
        body = parse_txn(read_body())
    except BadTxn as e:
        raise text(400, f"bad transaction: {e}") from None
    require_level_2(api)  # before the leader: an old leader would take a new request as an old one (S2)
    require_leader(api)
    index, result = propose(api, command(TXN, "", b"", body))
    if isinstance(result, NoLease):
        return text(404, f"lease {result.lease_id} not found: the transaction was not applied",
                    **{"X-Raft-Index": str(index)})
    if result == "lease full":
        return text(409, f"a lease would hold over {MAX_KEYS_PER_LEASE} keys: the transaction was not applied",
                    **{"X-Raft-Index": str(index)})
    if not isinstance(result, TxnResult):  # "error": checked above, so not expected
        return text(500, f"the transaction applied as nothing ({result}) at index {index}")
    # The answer as a write's 200 is made (set_key): on Bottle's response, cheaper than an HTTPResponse.
    bottle.response.content_type = "application/json"
    bottle.response.set_header("X-Raft-Index", str(index))
    return txn_answer_json(result, index)


def _watch_position(api: Api) -> int:
    """Where a watch starts: after Last-Event-ID (a reconnect), else after ?from=N, else after this node's last
    applied index (from now)."""
    req = bottle.request
    last_event_id = req.environ.get("HTTP_LAST_EVENT_ID")  # as sent (latin-1): Bottle's get_header decodes UTF-8
    name, given = ("Last-Event-ID", last_event_id) if last_event_id else ("from", req.query.get("from"))
    if given is None:
        return max(api.runtime.node.last_applied, api.watch_hub.applied_index)
    if not (given.isascii() and given.isdigit()) or len(given) > 18:  # "\xb2".isdigit() is True: int() fails
        raise text(400, f"{name} must be an index: an integer >= 0")
    return int(given)


def _watch_names(query_string: str) -> tuple[str | None, str | None]:
    """?key= and ?prefix= as /db/KEY names keys: percent-decoded, `+` a literal plus (Bottle's query decoding
    would make it a space: `/watch?key=a+b` would watch "a b", not the key `/db/a+b` wrote), UTF-8. The last of
    each wins, as in Bottle."""
    found: dict[str, str] = {}
    for pair in query_string.split("&"):
        name, _, value = pair.partition("=")
        name = urllib.parse.unquote(name)
        if name in ("key", "prefix"):
            try:
                # WSGI gives the query as latin-1 text: back to its bytes first (unquote_to_bytes would encode
                # raw non-ASCII again as UTF-8: `?key=r\xc3\xa9` watched "rÃ©" while /db wrote "ré").
                found[name] = urllib.parse.unquote_to_bytes(value.encode("latin-1")).decode("utf-8")
            except UnicodeError:  # not UTF-8 (or, outside WSGI, not latin-1 text)
                raise text(400, "key and prefix must be UTF-8") from None
    return found.get("key"), found.get("prefix")


def get_watch(api: Api) -> bottle.HTTPResponse:
    """GET /watch?key=K or ?prefix=P [&from=N] [&poll=1[&timeout=S]]: the changes after N (the module's rules)."""
    q = bottle.request.query
    key, prefix = _watch_names(bottle.request.environ.get("QUERY_STRING", ""))
    if (key is None) == (prefix is None):
        raise text(400, "a watch names ?key=K or ?prefix=P, one of them (an empty prefix watches every key)")
    if key is not None:
        check_key(key)
    poll = q.get("poll", "0")
    if poll not in ("0", "1"):
        raise text(400, "poll must be 1 (a long poll) or 0 (a stream)")
    timeout_seconds = DEFAULT_POLL_TIMEOUT_SECONDS
    if "timeout" in q:
        if poll != "1":
            raise text(400, "timeout goes with poll=1 (a stream has none)")
        try:
            timeout_seconds = float(q["timeout"])
            if not 0 <= timeout_seconds <= MAX_POLL_TIMEOUT_SECONDS:  # NaN fails it too
                raise ValueError
        except ValueError:
            raise text(400, f"timeout must be a number of seconds from 0 to {MAX_POLL_TIMEOUT_SECONDS:g}") from None
    position = _watch_position(api)
    removed = removed_text(api.runtime.node.removed)
    if removed:
        raise text(410, removed)
    mode = "poll" if poll == "1" else "stream"
    try:
        api.watch_hub.check(position)
    except Behind as e:
        api.metrics.watches_behind.inc(mode)
        raise text(410, str(e), **{"X-Raft-Oldest-Index": str(e.oldest_index)}) from None
    if api.metrics.watches_open >= api.max_watches:
        raise text(503, f"this node has {api.max_watches} watches open, its most: watch through another node")
    wanted = Filter(key, prefix)
    if mode == "poll":
        return _long_poll(api, position, wanted, timeout_seconds)
    return bottle.HTTPResponse(_stream(api, position, wanted, bottle.request.environ), 200, {
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **read_headers(api)})


def _long_poll(api: Api, position: int, wanted: Filter, timeout_seconds: float) -> bottle.HTTPResponse:
    """The answer carries X-Raft-Watch-Position, the next `from` (watch.py's positions), `[]` too. A client that
    closes (or half-closes: it cannot be told apart before the answer) is answered at once with what there is."""
    hub, metrics = api.watch_hub, api.metrics
    deadline = time.monotonic() + timeout_seconds
    handler = bottle.request.environ.get("raftdzmq.handler")  # None in process (tests)
    metrics.watches_open += 1
    watcher = hub.watch(position, wanted)
    stream = None if handler is None else Stream(handler, last_answer=False)
    try:
        while True:
            try:
                events = hub.next(watcher, max_bytes=MAX_POLL_BYTES)
            except Behind as e:
                metrics.watches_behind.inc("poll")
                return text(410, str(e), **{"X-Raft-Oldest-Index": str(e.oldest_index)})
            remaining = deadline - time.monotonic()
            ended = stream is not None and (stream.gone.is_set() or stream.eof.is_set())
            if events or remaining <= 0 or ended:
                metrics.watch_events.inc("poll", len(events))
                return bottle.HTTPResponse(hub.poll_body(events), 200, {
                    "Content-Type": "application/json", WATCH_POSITION_HEADER: str(watcher.position),
                    **read_headers(api)})
            with waiting_on_its_own(bottle.request.environ):  # bounded by remaining, at most a minute
                hub.wait_for(watcher, remaining, None if stream is None else stream.gone)
                if stream is not None and stream.eof.is_set():
                    continue
    finally:
        hub.unwatch(watcher)
        metrics.watches_open -= 1
        if stream is not None:
            stream.close()


def _stream(api: Api, position: int, wanted: Filter, environ: dict) -> Iterator[bytes]:
    """The chunks of a watch stream (Bottle and pywsgi send each as it comes, chunked). Not started, it holds
    nothing: the count, the registration and the connection's Stream begin with the first chunk. Its position goes
    out as an `id:` with the first chunk, after each index group, and with a keep-alive when it moved."""
    hub, metrics = api.watch_hub, api.metrics
    handler = environ.get("raftdzmq.handler")  # None in process (tests): no peer to watch
    metrics.watches_open += 1
    try:
        watcher = hub.watch(position, wanted)
    except Behind as e:  # the history moved between the check and the first chunk
        metrics.watches_open -= 1
        metrics.watches_behind.inc("stream")
        yield sse_error(str(e), e.oldest_index)
        return
    stream = None if handler is None else Stream(handler, user_timeout_seconds=2 * KEEPALIVE_SECONDS)
    gone = None if stream is None else stream.gone
    probes = 0
    try:
        yield f": watching after index {position}\nid: {position}\n\n".encode()  # the answer's head goes with it
        sent_position = position
        written_at = time.monotonic()
        while True:
            if stream is not None:
                stream.wrote()
                if stream.gone.is_set():
                    return
                if stream.eof.is_set() and probes < HALF_CLOSE_PROBES:
                    if probes:
                        gevent.sleep(EOF_PROBE_SECONDS)  # the reset to the first probe comes back meanwhile
                    probes += 1
                    yield b": are you there\n\n"  # fails once the client closed both ways: the stream ends
                    continue
            marked_at = watcher.marked_at  # the oldest event's apply, for this read's frame
            try:
                events, frame = hub.next_sse(watcher, max_bytes=MAX_STREAM_BYTES_PER_READ)
            except Behind as e:
                metrics.watches_behind.inc("stream")
                yield sse_error(str(e), e.oldest_index)
                return
            if events:
                metrics.watch_events.inc("stream", len(events))
                yield frame  # returns once the server wrote it to the socket
                metrics.watch_delivery_seconds.observe(time.monotonic() - marked_at)
                sent_position = events[-1][3]
                written_at = time.monotonic()
                continue
            remaining = KEEPALIVE_SECONDS - (time.monotonic() - written_at)
            if remaining <= 0:
                if watcher.position != sent_position:
                    sent_position = watcher.position
                    yield b": keep-alive\nid: %d\n\n" % sent_position
                else:
                    yield b": keep-alive\n\n"
                written_at = time.monotonic()
                continue
            hub.wait_for(watcher, remaining, gone if stream is None or not stream.eof.is_set() else None)
    finally:
        hub.unwatch(watcher)
        metrics.watches_open -= 1
        if stream is not None:
            stream.close()


# ---- leases ----------------------------------------------------------------------------------------------------


def parse_lease_id(raw: str) -> int:
    """A lease id as the API writes it: decimal digits (400 otherwise)."""
    if not (raw.isascii() and raw.isdigit() and 0 < len(raw) < 20) or int(raw) == 0:
        raise text(400, f"a lease id is a positive decimal number (as POST /lease answers it), not {raw!r}")
    return int(raw)


def ttl_seconds(api: Api) -> int:
    """?ttl=S: whole seconds, 1 to MAX_TTL_SECONDS, raised to `min_ttl_seconds` (the module's rules)."""
    raw = bottle.request.query.get("ttl", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) < 12) or not 1 <= int(raw) <= MAX_TTL_SECONDS:
        raise text(400, f"ttl must be whole seconds from 1 to {MAX_TTL_SECONDS}")
    return max(int(raw), api.min_ttl_seconds)


def leader_keeper(api: Api) -> LeaseKeeper:
    """The leader's LeaseKeeper; NotLeader (a redirect) on any other node."""
    require_leader(api)
    keeper = api.lease_keeper()
    if keeper is None:
        raise NotLeader(api.runtime.node.leader_id)
    return keeper


def confirmed_keeper(api: Api, term: int) -> LeaseKeeper:
    """The leader's LeaseKeeper for a keepalive whose read round confirmed leadership in `term`: refused (503, not
    extended) unless the keeper leads in that same term. Had leadership been lost and won back since the round, an
    expiry entry of the older term could still be ahead of the new term's no-op, the lease not yet gone here
    (re-review of lease, finding 3; leases' rules)."""
    keeper = leader_keeper(api)
    if keeper.term != term:
        raise text(503, f"leadership changed during the keepalive's read round (term {term}, now {keeper.term}); "
                   "the lease was not extended; retry", **{OUTCOME_HEADER: NOT_APPLIED})
    return keeper


def lease_gone(lease_id: int, in_state: bool) -> bottle.HTTPResponse:
    """The 404 of a lease this leader does not keep alive: still in the state, its expiry is on its way."""
    if in_state:
        return text(404, f"lease {lease_id} is expiring: its deadline passed and its expiry is proposed; grant a new "
                    "one")
    return text(404, f"lease {lease_id} not found (expired or revoked)")


MAX_LEASE_KEYS_LISTED = 1000  # GET /lease/ID lists this many of its keys (in order), and counts them all


def grant_lease(api: Api) -> bottle.HTTPResponse:
    """POST /lease?ttl=S -> {"id", "ttl"}: a lease whose id is its grant's index."""
    ttl = ttl_seconds(api)
    require_leader(api)
    require_level_2(api)
    index, result = propose(api, command(LEASE_GRANT, "", b"", ttl))
    if result == "full":
        return text(409, f"too many leases: at most {MAX_LEASES}; revoke some", **{"X-Raft-Index": str(index)})
    return json_answer({"id": str(index), "ttl": ttl}, **{"X-Raft-Index": str(index)})


def revoke_lease(api: Api, lease_id: str) -> bottle.HTTPResponse:
    """DELETE /lease/ID: the lease goes, and its keys with it (delete events)."""
    lid = parse_lease_id(lease_id)
    require_leader(api)
    require_level_2(api)
    index, result = propose(api, command(LEASE_REVOKE, "", b"", lid))
    if result == "missing":
        return text(404, f"lease {lid} not found", **{"X-Raft-Index": str(index)})
    return json_answer({"id": str(lid), "deleted": result, "index": index}, **{"X-Raft-Index": str(index)})


def keepalive_lease(api: Api, lease_id: str) -> bottle.HTTPResponse:
    """POST /lease/ID/keepalive -> {"id", "ttl"}: the lease runs its full TTL again from when this request arrived;
    404 once it is gone or being expired."""
    arrived_at = time.monotonic()  # before the read round: the deadline counts from here (leases' rules)
    lid = parse_lease_id(lease_id)
    require_leader(api)
    require_level_2(api)
    _, term = api.runtime.read(api.write_timeout_seconds)  # leadership confirmed after arrived_at; applied up to it
    keeper = confirmed_keeper(api, term)
    lease = api.store.leases.get(lid)
    if lease is None or not keeper.keepalive(lid, arrived_at):
        api.metrics.lease_keepalives.inc("not_found")
        return lease_gone(lid, lease is not None)
    api.metrics.lease_keepalives.inc("kept")
    return json_answer({"id": str(lid), "ttl": lease.ttl_seconds})


# Ids in one POST /lease/keepalive: 10,000 held the loop 37-85 ms (re-review of lease, finding 2); 1,000 about a
# tenth of that, and the answer stays under about 40 KiB.
MAX_KEEPALIVE_IDS = 1_000
# Its body at most: 1,000 ids of 19 digits quoted, with ", " between, take 23 KiB; a larger body is refused
# before it is parsed (a 1 MiB list took 33 ms to parse only to be refused).
MAX_KEEPALIVE_BODY_BYTES = 32 * 1024


def parse_lease_ids(raw: bytes) -> list[int]:
    """POST /lease/keepalive's body: a JSON list of 1 to MAX_KEEPALIVE_IDS lease ids (text as answers give them, or
    numbers); 400 naming the problem."""
    if len(raw) > MAX_KEEPALIVE_BODY_BYTES:
        raise text(400, f"the body is over {MAX_KEEPALIVE_BODY_BYTES} bytes: want a JSON list of 1 to "
                   f"{MAX_KEEPALIVE_IDS} lease ids")
    try:
        ids = json.loads(raw)
    except (ValueError, RecursionError):
        raise text(400, 'the body is not JSON: want a list of lease ids, e.g. ["57", "61"]') from None
    if type(ids) is not list or not 1 <= len(ids) <= MAX_KEEPALIVE_IDS:
        raise text(400, f"want a JSON list of 1 to {MAX_KEEPALIVE_IDS} lease ids")
    out = []
    for n, value in enumerate(ids):
        if type(value) is str and value.isascii() and value.isdigit() and len(value) < 20:
            value = int(value)
        if type(value) is not int or value <= 0:
            raise text(400, f"item {n}: a lease id is a positive decimal number (as POST /lease answers it)")
        out.append(value)
    return out


def keepalive_leases(api: Api) -> bottle.HTTPResponse:
    """POST /lease/keepalive with a JSON list of ids -> {"leases": [{"id", "ttl"} or {"id", "error"}, ...]}, in the
    order asked: each as POST /lease/ID/keepalive would answer it, behind one read round for all (review of lease,
    R3: a round per lease cost the leader about 350 us of CPU each)."""
    arrived_at = time.monotonic()  # before the read round, as for one lease
    ids = parse_lease_ids(read_body())
    require_leader(api)
    require_level_2(api)
    _, term = api.runtime.read(api.write_timeout_seconds)
    keeper = confirmed_keeper(api, term)
    leases = api.store.leases
    answers: list[dict] = []
    kept = 0
    for lid in ids:
        lease = leases.get(lid)
        if lease is not None and keeper.keepalive(lid, arrived_at):
            answers.append({"id": str(lid), "ttl": lease.ttl_seconds})
            kept += 1
        else:
            answers.append({"id": str(lid), "error": "expiring" if lease is not None else "not found"})
    api.metrics.lease_keepalives.inc("kept", kept)
    api.metrics.lease_keepalives.inc("not_found", len(ids) - kept)
    return json_answer({"leases": answers})


def get_lease(api: Api, lease_id: str) -> bottle.HTTPResponse:
    """GET /lease/ID -> {"id", "ttl", "remaining", "keys", "key_count"}: remaining seconds by the leader's clock."""
    lid = parse_lease_id(lease_id)
    require_leader(api)
    api.runtime.read(api.read_timeout_seconds)
    keeper = leader_keeper(api)
    lease = api.store.leases.get(lid)
    remaining = keeper.remaining_seconds(lid, time.monotonic())
    if lease is None or not keeper.alive(lid):
        return lease_gone(lid, lease is not None)
    keys = sorted(lease.keys)
    return json_answer({"id": str(lid), "ttl": lease.ttl_seconds, "remaining": round(remaining or 0.0, 3),
                        "keys": keys[:MAX_LEASE_KEYS_LISTED], "key_count": len(keys)})


def list_leases(api: Api) -> bottle.HTTPResponse:
    """GET /lease[?after=ID&limit=N] -> {"leases": [{"id", "ttl", "remaining"}, ...], "next"}: in id order."""
    q = bottle.request.query
    after = parse_lease_id(q["after"]) if q.get("after") else 0
    try:
        limit = min(max(int(q.get("limit", "1000")), 1), 10000)
    except ValueError:
        raise text(400, "limit must be an integer") from None
    require_leader(api)
    api.runtime.read(api.read_timeout_seconds)
    keeper = leader_keeper(api)
    now = time.monotonic()
    page: list[dict] = []
    more = False
    leases = api.store.leases
    # Bisected, not a scan of every lease from the first (review of lease, R6): the ids after `after`, in order.
    for lid in api.store.lease_ids.irange(minimum=after, inclusive=(False, True)):
        if not keeper.alive(lid):
            continue
        if len(page) == limit:
            more = True
            break
        page.append({"id": str(lid), "ttl": leases[lid].ttl_seconds,
                     "remaining": round(keeper.remaining_seconds(lid, now) or 0.0, 3)})
    return json_answer({"leases": page, "next": page[-1]["id"] if more else None})


def join_refusal(membership: Membership, member: Member, secret: bool, max_members: int = 64,
                 fenced: frozenset[str] = frozenset()) -> str | None:
    """Why a join of `member` is refused (409) in the configuration `membership`, else None. A join that names a
    member exactly as the configuration has it is a retry of the same join and not refused. `secret`: the cluster
    has a secret (node keys); `max_members`: the most members (voters and learners) a join may bring it to;
    `fenced`: the members this node removed by -force-new-cluster."""
    node_id, public_key = member.node_id, member.public_key
    name = name_of(node_id)
    if name in {name_of(f) for f in fenced}:
        # Review of ops, finding 7: the fence drops a removed member's messages only while its id is not a member;
        # a node of that name joining again would let it be heard.
        return (f"{name} is a member that -force-new-cluster removed: a fresh node takes a new name (and the old "
                "one's data dir is wiped)")
    namesake = next((m for m in membership.node_ids if m != node_id and name_of(m) == name), None)
    if namesake is not None:
        # Review of ops, finding 1: a node on a new data dir under a member's name is not that member (it has none
        # of its log nor its votes): the member must go first.
        return (f"member {namesake} has the name {name}: a node on a new data dir is a new node; remove it first "
                f"(DELETE /cluster/{name}), then join")
    keyless = [m for m in membership.node_ids if not getattr(membership.member(m), "public_key", "")]
    if secret and keyless:
        # Review 3 F3: the joining node could not admit these members (nor they it): it would wait for ever.
        return (f"members {', '.join(keyless)} have no node key (a cluster made by a raftdzmq before node keys, or "
                "without a secret): it cannot take new nodes with a secret; recreate it with this version")
    known = membership.member(node_id)
    if known is not None and known.public_key != public_key:
        # A signed join must not give a member's identity to another key: only its own key speaks as it.
        return f"node {node_id} is a member with another key: remove it first"
    if known is not None and known != member:
        # Review 3 F4: a join naming a member's id and key with other addresses moved the member (a follower's
        # 307 then sent clients to the join's address). A node's addresses are fixed by its first join.
        return (f"node {node_id} is a member at {known.raft_address} (raft) and {known.http_address} (http): a join "
                "does not move a member; remove it first")
    if public_key:
        # Review 3 F2: a member's public key (GET /cluster lists them) named by another node id took that member's
        # frames from it on every node, cutting it off.
        owner = next((m.node_id for m in membership.members if m.public_key == public_key and m.node_id != node_id),
                     None)
        if owner is not None:
            return f"this public key is member {owner}'s: every node needs a key of its own"
    if known is None and len(membership.node_ids) >= max_members:
        # Review 3 F5: every member is in every membership entry and snapshot, and costs each node a socket and a
        # sender; signed learner joins without end would grow all of them.
        return (f"the cluster has {len(membership.node_ids)} members, the most -max-members allows: remove one "
                "first")
    return None


def level_refusal(api: Api, body: dict) -> bottle.HTTPResponse | None:
    """The 409 for a join whose node says a feature level below the cluster's (an older release says none)."""
    cluster_level, joining_level = api.store.feature_level, body.get("feature_level", 1)
    if cluster_level >= 2 and (type(joining_level) is not int or joining_level < cluster_level):
        return text(409, f"the joining node runs an older raftdzmq (feature level {joining_level}) than the "
                    f"cluster (feature level {cluster_level}): upgrade it, then join")
    return None


def join(api: Api) -> bottle.HTTPResponse:
    """Add the node the body names as a learner. With a cluster secret the body names its CURVE public key too,
    and the answer lists the members' keys, signed (admin.answer_headers): the joining node admits them."""
    raw = read_body()
    check_signature(api, "join")
    try:
        body = json.loads(raw or b"null")
        fields = [body[k] for k in ("node_id", "raft_address", "http_address")]
        if not all(isinstance(f, str) and 0 < len(f) < 256 and f.isprintable() for f in fields):
            raise ValueError
    except (ValueError, TypeError, KeyError, RecursionError):
        return text(400, 'bad join body: want JSON {"node_id": ..., "raft_address": ..., "http_address": ...}')
    public_key = ""
    if api.guard is not None:
        public_key = body.get("public_key")
        if not valid_public_key(public_key):
            return text(400, "bad join body: with a cluster secret, want the node's CURVE public key as "
                        '"public_key" (40 characters of Z85)')
    require_leader(api)
    member = Member(fields[0], fields[1], fields[2], public_key)
    refusal = join_refusal(api.runtime.node.membership, member, api.guard is not None, api.max_members,
                           api.fenced())
    if refusal is not None:
        return text(409, refusal)
    # Under the membership lock: the leader's FeatureLevelRaiser raises the cluster's level under it too, only if
    # the configuration then is the one whose members it asked (no change since: a removal of this id included),
    # so this join comes either before (and is asked) or after (and is checked here).
    if not api.membership_lock.acquire(timeout=api.write_timeout_seconds):
        return text(503, "join not possible now: the cluster's feature level is being raised; retry")
    try:
        deadline = time.monotonic() + api.write_timeout_seconds
        # Review of coord1, S1: the applied level is stale while this leader's log holds a raise not applied yet
        # (the raiser's proposal timed out and released the lock; or a new leader, whose predecessor's raise
        # commits only with an entry of its own term, §5.4.2 and its no-op, §8). Every raise is in the log up to
        # last_index (a later one needs this lock, or another leader, which fails the change): wait for it.
        last_index = api.runtime.status().node.last_index
        if last_index > api.runtime.node.last_applied:
            try:
                api.runtime.wait_applied(last_index, api.write_timeout_seconds)
            except Timeout:
                return text(503, "join not possible now: this leader has not applied its log yet; retry")
        if (refusal := join_refusal_now(api, body, member)) is not None:
            return refusal
        claim_signature(api, "join")
        change = ConfChange(ConfChangeKind.ADD_LEARNER, member)
        while True:
            try:
                index, _ = api.runtime.change_membership(change, api.write_timeout_seconds)
                break
            except ProposalDropped:  # another change in flight: wait for it
                if time.monotonic() > deadline:
                    raise
                gevent.sleep(0.05)
                if (refusal := join_refusal_now(api, body, member)) is not None:  # it may have applied meanwhile
                    return refusal
    finally:
        api.membership_lock.release()
    log.info("node %s (%s) joined as a learner", fields[0], fields[2])
    if api.guard is None:
        return json_answer({"index": index})
    node = api.runtime.status().node
    # The joining node admits these keys until its log holds the configuration at `index`, the one that added it
    # (raftlib.transport, "vouched keys"): not before, however old the configurations its first appends carry.
    answer = json.dumps({"index": index, "leader": node.node_id,
                         "members": {m.node_id: m.public_key for m in node.membership.members},
                         "http_addresses": {m.node_id: m.http_address for m in node.membership.members}}).encode()
    headers = answer_headers(api.guard.secret, bottle.request.get_header(SIGNATURE_HEADER), answer)
    return bottle.HTTPResponse(answer, 200, {"Content-Type": "application/json", **headers})


def node_request_refusal(api: Api, what: str) -> bottle.HTTPResponse | None:
    """With a secret, a request to this node alone (GET /cluster/keys, GET /snapshot: admin.node_request_headers):
    its answer (400, 421) when it lacks its nonce or names another node; Forbidden when it is not signed; else
    None."""
    assert api.guard is not None
    req = bottle.request
    nonce, asked = req.get_header(NONCE_HEADER), req.get_header(NODE_HEADER)
    if not valid_nonce(nonce):
        return text(400, f"a {what} needs {NONCE_HEADER}: a fresh random nonce of 32 to 128 hex digits")
    if not asked:
        return text(400, f"a {what} needs {NODE_HEADER}: the id of the node asked")
    reason = api.guard.verify(req.method, req.environ["REQUEST_URI"], keys_request_body(nonce, asked),
                              req.get_header(TIMESTAMP_HEADER), req.get_header(SIGNATURE_HEADER))
    if reason is not None:
        raise Forbidden(what, reason)
    node_id = api.runtime.status().node.node_id
    if asked != node_id:
        return text(421, f"this is node {node_id}, not {asked}: ask the node at the address it gave")
    return None


def cluster_keys(api: Api) -> bottle.HTTPResponse:
    """GET /cluster/keys, with a cluster secret: this node's newest committed configuration (its index, the
    members' public keys and HTTP addresses), whether or not it leads, for a node whose own configuration may be older (it admits
    these keys on its Raft port until its log catches up: raftlib.transport, "vouched keys"). The request carries
    a fresh nonce and the id of the node it asks, and is signed with both as the body (admin.keys_request_headers);
    a request meant for another node is refused (421: review of edge5, finding 1, another cluster's node at a
    member's old address answered for it). Its signature is not remembered (review of edge5, finding 3: every
    keys request took a place in the AdminGuard for 600 s): the answer is signed for this request's own fresh
    nonce, so a replayed request gets only an answer its asker will not take, and nothing changes. Nothing goes
    through the log: any member answers, a lagging one too. The answer names this node and is signed for that
    request (admin.answer_headers)."""
    if api.guard is None:
        return text(404, "no cluster secret: nodes have no keys")
    refusal = node_request_refusal(api, "keys request")
    if refusal is not None:
        return refusal
    node_id = api.runtime.status().node.node_id
    # Committed only (review of edge5, finding 2): an uncommitted configuration may be cut off, and a list at its
    # index would stay with the asker until its log passed that index.
    committed = api.committed_configuration()
    if committed is None:
        return text(503, "this node has no committed configuration yet; ask another member")
    index, membership = committed
    answer = json.dumps({"node_id": node_id, "index": index,
                         "members": {m.node_id: m.public_key for m in membership.members},
                         "http_addresses": {m.node_id: m.http_address for m in membership.members}}).encode()
    headers = answer_headers(api.guard.secret, bottle.request.get_header(SIGNATURE_HEADER), answer)
    return bottle.HTTPResponse(answer, 200, {"Content-Type": "application/json", **headers})


def get_status(api: Api) -> bottle.HTTPResponse:
    status = api.runtime.status()
    node = status.node
    return json_answer({
        "node_id": node.node_id, "role": node.role.value, "term": node.term, "leader": node.leader_id,
        "leader_http": leader_http(node.membership, node.leader_id), "commit_index": node.commit_index,
        "applied_index": node.last_applied, "last_index": node.last_index, "snapshot_index": node.snapshot_index,
        "members": members(node), "keys": len(api.store), "data_size": api.data_size(),
        "disk_full": status.disk_full, "uncommitted_bytes": node.uncommitted_bytes,
        "removed": node.removed and {"by": node.removed[0], "index": node.removed[1]},
        "feature_level": api.feature_level, "cluster_feature_level": api.store.feature_level,
    })


def livez(api: Api) -> bottle.HTTPResponse:
    """200 `ok` while the runtime drives the node (answering at all shows the loop runs); else 503 and why
    (raftlib.server.health). ?verbose: every check."""
    checks = liveness(api.runtime.status().running)
    return health_answer("livez", checks)


def readyz(api: Api) -> bottle.HTTPResponse:
    """200 `ok` when this node is a member, knows an active leader, has applied what it knows to be committed, has
    room on its disk, and then a linearizable read (a ReadIndex round, shared with the reads waiting) completes
    within READY_READ_SECONDS or an election timeout, the longer; else 503 and why (raftlib.server.health). ?verbose: every check (the read only
    when the others passed)."""
    status = api.runtime.status()
    checks = readiness(status, time.monotonic())
    if all(reason is None for _, reason in checks):
        # At least an election timeout: a cluster whose -election-ms is set for long round trips is not unready
        # for them (last review, item 1).
        budget_seconds = max(READY_READ_SECONDS, status.election_timeout_seconds)
        try:
            api.runtime.read(budget_seconds)
            checks.append(("read", None))
        except (NotLeader, Timeout, Stopped):
            checks.append(("read", f"applying: a linearizable read did not complete within {budget_seconds:g}s "
                                   "(behind the leader's commit index, or no quorum)"))
    return health_answer("readyz", checks)


def health_answer(what: str, checks: list[tuple[str, str | None]]) -> bottle.HTTPResponse:
    ok, message = report(what, checks, "verbose" in bottle.request.query)
    # No store: a prober must never see an answer of the past.
    return text(200 if ok else 503, message, **{"Cache-Control": "no-store"})


def get_metrics(api: Api) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(prom.generate_latest(api.metrics.registry), 200,
                               {"Content-Type": prom.CONTENT_TYPE_LATEST})


def join_refusal_now(api: Api, body: dict, member: Member) -> bottle.HTTPResponse | None:
    """Under the membership lock, in the configuration of now: the level's refusal, and join_refusal's again
    (review of ops 2, C: checked only before the lock, two joins under one name, or past max_members, that
    waited for it both became members)."""
    if (refusal := level_refusal(api, body)) is not None:
        return refusal
    reason = join_refusal(api.runtime.node.membership, member, api.guard is not None, api.max_members, api.fenced())
    return None if reason is None else text(409, reason)


def get_cluster(api: Api) -> bottle.HTTPResponse:
    return json_answer(members(api.runtime.status().node))


def member_named(membership: Membership, node_id_or_name: str) -> str:
    """The member whose id is `node_id_or_name`, else the one whose -name it is (nodestart.name_of: a node started
    with -name NAME has the id NAME-<8 hex>), else `node_id_or_name` itself; 409 (raised) when several have it."""
    if node_id_or_name in membership.node_ids:
        return node_id_or_name
    named = [m for m in membership.node_ids if name_of(m) == node_id_or_name]
    if len(named) > 1:  # (an older raftdzmq let two joins under one name both in: review of ops 2, C)
        raise text(409, f"{node_id_or_name} is the name of several members ({', '.join(named)}): give the id")
    return named[0] if named else node_id_or_name


def remove_member(api: Api, node_id: str) -> bottle.HTTPResponse:
    check_signature(api, "removal")
    require_leader(api)
    node_id = member_named(api.runtime.node.membership, node_id)
    if node_id not in api.runtime.node.membership.node_ids:
        return text(404, f"{node_id} is not a member")  # before the claim: nothing goes into the log
    claim_signature(api, "removal")
    index, _ = api.runtime.change_membership(ConfChange(ConfChangeKind.REMOVE, Member(node_id)),
                                             api.write_timeout_seconds)
    return text(200, f"removed {node_id}", **{"X-Raft-Index": str(index)})


def transfer(api: Api) -> bottle.HTTPResponse:
    target = bottle.request.query.get("to", "")
    check_signature(api, "transfer")
    require_leader(api)
    claim_signature(api, "transfer")
    deadline = time.monotonic() + api.write_timeout_seconds
    api.runtime.transfer_leadership(target, api.write_timeout_seconds)
    confirm_leader(api, target, deadline)
    return text(200, f"leader is now {target}")


def confirm_leader(api: Api, target: str, deadline: float) -> None:
    """After a transfer: Timeout unless `target` is confirmed as the leader by `deadline`. The runtime returns
    once this node has heard of `target` leading, which a target that cannot hold leadership also does for a
    moment (review 3 F2: a target cut off from the others won an election, lost it to check-quorum, and the
    transfer answered 200). A linearizable read through this node settles it (thesis §6.4): the leader answers
    only once an entry of its term has committed and a majority answered its heartbeat round after the read."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{target} was not confirmed as the leader within {api.write_timeout_seconds:g}s")
        try:
            api.runtime.read(remaining)
        except NotLeader:  # between two leaders: ask again, within the bound
            gevent.sleep(0.02)
            continue
        except NotRunning as e:
            # The read was never queued, but the transfer was: TimeoutNow went out and the target may lead. Not
            # `not-applied` (review S1): the transfer's outcome is unknown.
            raise Stopped(f"{e}; the transfer was started") from None
        leader = api.runtime.node.leader_id
        if leader == target:
            return
        raise Timeout(f"{leader or 'no node'} leads, not {target}")


# ---- backups ----------------------------------------------------------------------------------------------------

SNAPSHOT_INDEX_HEADER = "X-Raft-Snapshot-Index"
SNAPSHOT_SHA256_HEADER = "X-Raft-Snapshot-Sha256"
BACKUP_PIECE_BYTES = 1 << 20


def get_snapshot(api: Api) -> bottle.HTTPResponse:
    """GET /snapshot: a backup, on any node: the snapshot file (docs/DATA-DIR.md) of this node's state at an
    index N it applied, N at least the read index of a linearizable read made first (?consistency= and
    ?min_index= as for GET /db/KEY): every write acknowledged before the request is in it. Headers
    X-Raft-Snapshot-Index (N) and X-Raft-Snapshot-Sha256 (of the body). Written by a forked child
    (Runtime.backup: one at a time, else 503), then streamed. With a cluster secret, signed for this node with a
    fresh nonce (node_request_refusal) and claimed here: a replay is refused (review of ops, finding 5: a signed
    request seen once downloaded the whole state again, on any node, for 300 s)."""
    if api.guard is not None:
        refusal = node_request_refusal(api, "backup")
        if refusal is not None:
            return refusal
        reason = api.guard.claim(bottle.request.get_header(SIGNATURE_HEADER))
        if reason is not None:
            raise Forbidden("backup", reason)
    wait_consistent(api)
    with waiting_on_its_own(bottle.request.environ):  # bounded by backup_timeout_seconds
        backup = api.runtime.backup(api.backup_folder, api.backup_timeout_seconds)
    log.info("backup at index %d (%d bytes, sha256 %s) for %s", backup.index, backup.size, backup.sha256,
             bottle.request.remote_addr)
    return bottle.HTTPResponse(BackupBody(backup, bottle.request.environ), 200, {
        "Content-Type": "application/octet-stream", "Content-Length": str(backup.size),
        SNAPSHOT_INDEX_HEADER: str(backup.index), SNAPSHOT_SHA256_HEADER: backup.sha256})


class BackupBody:
    """The backup's bytes a piece at a time; the sweeper's busy bound counts from each piece (a slow reader of a
    large backup is cut off only when it stops reading). An iterable with close(), which the WSGI server calls at
    the end or when the client goes, even before the first piece (a generator's `finally` would not run then):
    it closes the Backup, ending its count (Runtime.backup, one at a time)."""

    def __init__(self, backup: Backup, environ: dict) -> None:
        self.backup, self.environ = backup, environ

    def __iter__(self) -> Iterator[bytes]:
        try:
            while piece := self.backup.file.read(BACKUP_PIECE_BYTES):
                yield piece
                with waiting_on_its_own(self.environ):
                    pass
        finally:  # read whole, or failed: Bottle peeks at the first piece and may not call close() then
            self.close()

    def close(self) -> None:
        self.backup.close()


# (method, path, route, the operation its failures are answered as)
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("POST", "/db/<key:path>", set_key, "write"),
    ("PUT", "/db/<key:path>", set_key, "write"),
    ("DELETE", "/db/<key:path>", delete_key, "write"),
    ("GET", "/db/<key:path>", get_key, "read"),
    ("GET", "/db/", list_keys, "read"),
    ("GET", "/db", list_keys, "read"),
    ("DELETE", "/db/", delete_prefix, "write"),
    ("DELETE", "/db", delete_prefix, "write"),
    ("POST", "/txn", post_txn, "write"),
    ("GET", "/watch", get_watch, "read"),
    ("POST", "/lease", grant_lease, "write"),
    ("GET", "/lease", list_leases, "lease"),
    ("POST", "/lease/keepalive", keepalive_leases, "keepalive"),
    ("POST", "/lease/<lease_id>/keepalive", keepalive_lease, "keepalive"),
    ("GET", "/lease/<lease_id>", get_lease, "lease"),
    ("DELETE", "/lease/<lease_id>", revoke_lease, "write"),
    ("POST", "/join", join, "join"),
    ("GET", "/status", get_status, "status"),
    ("GET", "/livez", livez, "status"),
    ("GET", "/readyz", readyz, "status"),
    ("GET", "/metrics", get_metrics, "status"),
    ("GET", "/cluster", get_cluster, "status"),
    ("GET", "/cluster/keys", cluster_keys, "keys"),
    ("DELETE", "/cluster/<node_id>", remove_member, "removal"),
    ("POST", "/cluster/transfer", transfer, "transfer"),
    ("GET", "/snapshot", get_snapshot, "backup"),
)


SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))  # the methods a cross-site request may use (the module's rules)


def cross_site_refusal(req: bottle.BaseRequest) -> bottle.HTTPResponse | None:
    """403 for a request of another method than SAFE_METHODS that a page of another site made a browser send
    (Sec-Fetch-Site cross-site or same-site, or an Origin whose host:port is not the request's Host); else None."""
    if req.method in SAFE_METHODS:
        return None
    origin = req.get_header("Origin")
    if (req.get_header("Sec-Fetch-Site") not in ("cross-site", "same-site")
            and (origin is None or urllib.parse.urlsplit(origin).netloc.lower() == req.get_header("Host", "").lower())):
        return None
    return text(403, "refused: sent by a page of another site (Origin or Sec-Fetch-Site); "
                "send it without those headers or from this node's own page")


def _serving(api: Api, route: Callable[..., object], operation: str) -> Callable[..., object]:
    """The callback Bottle calls for `route`: a closure rather than functools.partial, one layer less per request."""

    if operation not in WRITE_OPERATIONS:
        def serve(**url_args: str) -> object:
            try:
                refusal = cross_site_refusal(bottle.request)
                if refusal is not None:
                    return refusal
                return route(api, **url_args)
            except _CAUGHT as e:
                return failure_answer(api, operation, e)

        return serve

    def serve_write(**url_args: str) -> object:
        try:
            refusal = cross_site_refusal(bottle.request)
            answer = refusal if refusal is not None else route(api, **url_args)
        except bottle.HTTPResponse as e:  # a route's refusal of bad input (check_key)
            answer = e
        except _CAUGHT as e:
            answer = failure_answer(api, operation, e)
        if isinstance(answer, bottle.HTTPResponse) and answer.status_code >= 300:
            with_outcome(answer)
        return answer

    return serve_write


def with_outcome(answer: bottle.BaseResponse) -> None:
    """Give a write's failed answer an X-Raft-Outcome when it names none: `unknown` for 500 and more (a failure
    not foreseen, or a leader's that named none), `not-applied` under 500 (bad input, a refusal, a redirect)."""
    if OUTCOME_HEADER not in answer.headers:
        answer.set_header(OUTCOME_HEADER, UNKNOWN if answer.status_code >= 500 else NOT_APPLIED)


def _default_error(res: bottle.HTTPError) -> str:
    """Bottle's own errors (404 no such route, 405, 500) as one line of text, never a page or a traceback; on a
    write, with its X-Raft-Outcome (a 500 is a failure not foreseen, which may come after the proposal)."""
    bottle.response.content_type = "text/plain; charset=utf-8"
    if bottle.request.method in WRITE_METHODS:  # a read's answer names no outcome, even a 405
        with_outcome(bottle.response)
    return f"{res.status_line}: {res.body}\n" if isinstance(res.body, str) and res.body else f"{res.status_line}\n"


def make_app(api: Api) -> bottle.Bottle:
    """The WSGI application of `api`: every route of ROUTES and of the dashboard (raftlib.server.dashboard)."""
    from .dashboard import ROUTES as DASHBOARD_ROUTES  # here: the dashboard's module imports this one

    app = bottle.Bottle(catchall=True)
    app.default_error_handler = _default_error
    for method, path, route, operation in ROUTES + DASHBOARD_ROUTES:
        app.route(path, method, _serving(api, route, operation))
    return app
