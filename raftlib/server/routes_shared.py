"""What every route of the HTTP API shares (the routes_* modules', and the dashboard's): the `Api` (the runtime, the
store, the metrics, the timeouts), `failure_answer`, the one place where a failure becomes a status and a line of
text, the answers' builders, the redirect to the leader and -forward, and the checks and waits a request goes
through (its key, the leader, an admin signature, a read's consistency, the feature level, lease ids and TTLs).
raftlib.server.api builds the application of them all.

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
- Every answer to a write (POST/PUT/DELETE on /db and /lease, a lease's keepalive, and the admin requests: join,
  removal, transfer) that is not a success carries X-Raft-Outcome (issue 15): `not-applied` when the write surely
  took no effect (refused before it was proposed, a proposal the core dropped, an entry overwritten by another
  leader, bad input, a redirect; a keepalive that failed, which extends nothing before its read round) and may be
  retried, `unknown` when it was (or may have been) proposed and its fate is not known: never retry that
  blindly. The mapping is in _ANSWERS; an answer of 500 or more that names no outcome says `unknown`, one under 500
  says `not-applied` (`api._serving`). A -forward follower passes the leader's on.
- The API of feature level 2 (?prev_index=N, DELETE /db/?prefix=P, POST /txn, the leases: issue 14) is answered
  409 while the cluster's feature level (the store's, replicated) is below 2: an older release would apply its
  commands as nothing and the nodes would diverge. A request is checked whole (400 naming the problem) before it
  is proposed.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import bottle
import gevent
import gevent.lock

from raftlib.core import NodeStatus, NotLeader, ProposalDropped, TargetRestoring, UncommittedBoundExceeded
from raftlib.events import EventRing
from raftlib.messages import ConfChange, Membership, Role
from raftlib.runtime import Backup, BackupBusy, BackupFailed, EntryLost, NotRunning, RuntimeStatus, Stopped, Timeout
from raftlib.storage_errors import DiskFull

from .admin import (NODE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, AdminGuard, keys_request_body,
                    valid_nonce, wire_target)
from .edge import RateLimitedLog
from .forwarding import LeaderConnections, NoAnswer, NotSent
from .leases import LeaseKeeper
from .metrics import Metrics
from .store import ADMIN_CLAIM, FEATURE_LEVEL, MAX_TTL_SECONDS, KeyValueStore, command
from .watch import WatchHub

log = logging.getLogger("raftdzmq.api")

NOT_LEADER = "raft.Server: Not current leader"  # the Go original's text for a write sent to a follower
FORWARDED_HEADER = "X-Raftdzmq-Forwarded"  # set by a -forward follower: the leader answers it, never forwards it
MAX_KEY_BYTES = 4096
MAX_WATCHES = 10_000  # watches (streams and long polls) open at once on one node; 503 beyond
BACKUP_MIN_RATE = 256 << 10  # bytes a second a backup's reader must take on average (-backup-min-rate; routes_ops)
OUTCOME_HEADER = "X-Raft-Outcome"  # on every failed write's answer (the module's rules)
NOT_APPLIED, UNKNOWN = "not-applied", "unknown"


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
    `connect` opens the connections a -forward follower passes requests on with (http.client's, unless a test
    gives another), kept in `leader_connections`."""

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
    leader_connections: LeaderConnections = field(default_factory=LeaderConnections)
    admin_refusals: RateLimitedLog = field(default_factory=lambda: RateLimitedLog("refused admin requests", log))
    forward_failures: RateLimitedLog = field(default_factory=lambda: RateLimitedLog("failed forwards", log, 5.0))
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
    # Whether the node's WatchGuard (raftlib.server.watchguard) runs: GET /readyz fails while it does not.
    watch_guard_alive: Callable[[], bool] = lambda: True
    # The leader's LeaseKeeper, in step with the node's role and term; None while this node does not lead.
    lease_keeper: Callable[[], LeaseKeeper | None] = lambda: None
    min_ttl_seconds: int = 1
    # GET /snapshot: the folder its file is written in (the data dir: start-up deletes a *.tmp left by a crash),
    # and how long the whole backup may take to write (the runtime's bound on a snapshot child).
    backup_folder: str = "."
    backup_timeout_seconds: float = 600.0
    backup_min_rate: int = BACKUP_MIN_RATE  # -backup-min-rate: routes_ops.BackupBody's bound on its reader
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


class MalformedHeader(Exception):
    """A header of this API's own (X-Raftdzmq-*) that is not of its shape: 403 for the admin signature's (the
    request is not signed), 400 for the others; answered before anything is proposed or forwarded (review edge3,
    L3: Bottle's get_header raised UnicodeDecodeError on bytes that are not UTF-8, a 500 and a traceback a
    request)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"malformed {name} header: want 1 to {MAX_OWN_HEADER_BYTES} visible ASCII characters")
        self.name = name
        self.status = 403 if name in (TIMESTAMP_HEADER, SIGNATURE_HEADER) else 400


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
        # Nothing was started. Refused by the route's check, before the claim: the same signature may be sent
        # again; by the core's (the target began restoring after that check), after it: sign it again.
        TargetRestoring: (409, "{e}", None, NOT_APPLIED),
    },
}
# What failure_answer answers: api._serving catches these (and only these) around every route.
ANSWERED_FAILURES = (NotLeader, Forbidden, Unconfirmed, NotApplied, MalformedHeader, ProposalDropped, EntryLost, Timeout,
                     DiskFull, Stopped, ValueError, TargetRestoring, BackupBusy, BackupFailed)


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
        case MalformedHeader():
            return malformed_header_answer(api, e)
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


def malformed_header_answer(api: Api, e: MalformedHeader) -> bottle.HTTPResponse:
    """The answer to a request with a MalformedHeader, logged as refusals are (at most once a second): nothing
    was proposed nor forwarded, so a write's is `not-applied`."""
    api.admin_refusals.log(logging.WARNING, "refused a request from %s: %s", bottle.request.remote_addr, e)
    return text(e.status, f"refused: {e}", **{OUTCOME_HEADER: NOT_APPLIED})


_OWN_HEADER_VALUE = re.compile(r"[\x21-\x7e]+")
MAX_OWN_HEADER_BYTES = 256  # a signature is 64 hex digits, a nonce at most 128, a node id or a timestamp fewer


def own_header(name: str) -> str | None:
    """This API's own header `name` (X-Raftdzmq-*, which carry ids, hex and digits), read from the environ as the
    edge wrote it (latin-1, PEP 3333) rather than through Bottle's get_header (which decodes UTF-8 and raises on
    other bytes); None when absent; MalformedHeader unless 1 to MAX_OWN_HEADER_BYTES visible ASCII characters."""
    value = bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"))
    if value is None:
        return None
    if len(value) > MAX_OWN_HEADER_BYTES or _OWN_HEADER_VALUE.fullmatch(value) is None:
        raise MalformedHeader(name)
    return value


def text(status: int, message: str, **headers: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(message + "\n", status, {"Content-Type": "text/plain; charset=utf-8", **headers})


# A page of keys (GET /db/, GET /lease/ID's keys) holds at most this many bytes of keys as JSON, as a long poll
# (MAX_POLL_BYTES) and a txn's answer (routes_txn.MAX_TXN_ANSWER_BYTES) are bounded: a key of 4,096 control bytes is
# 24.5 KB of JSON, and 10,000 of them made one answer of 245 MB (review edge3, L2).
MAX_PAGE_BYTES = 4 << 20

# A str as json.dumps writes it (ensure_ascii): json's own C function, without a dumps call around it.
json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def keys_within(keys: list[str], budget: int = MAX_PAGE_BYTES) -> tuple[list[str], bool]:
    """`keys` as JSON strings, cut where they would pass `budget` bytes of JSON (at least the first one: a key is
    at most 24.5 KB of it), and whether some were cut. Each counts as json.dumps writes it, with its ", "."""
    out: list[str] = []
    size = 0
    for key in keys:
        encoded = json_string(key)
        size += len(encoded) + 2
        if size > budget and out:
            return out, True
        out.append(encoded)
    return out, False


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


def current_leader_http(api: Api) -> str | None:
    node = api.runtime.node
    return leader_http(node.membership, node.leader_id)


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
    try:
        if api.forward and own_header(FORWARDED_HEADER) is None:
            return forward_to(api, leader)
    except MalformedHeader as e:  # raised here in failure_answer, which _serving does not guard
        return malformed_header_answer(api, e)
    return text(307, NOT_LEADER, Location=f"http://{leader}{wire_target(bottle.request.environ['REQUEST_URI'])}")


# The leader's answer headers a forwarding follower hands back: every X-Raft- header (the README's: X-Raft-Index,
# X-Raft-Modify-Index on a 412, X-Raft-Outcome, X-Raft-Lease, X-Raft-Lease-TTL, ...), the body's type, a redirect's
# Location, and the signature of a signed answer (a join's), without which the joining node must refuse the answer.
_FORWARDED_ANSWER_HEADERS = frozenset(("content-type", "location", TIMESTAMP_HEADER.lower(), SIGNATURE_HEADER.lower()))


def forwarded_answer_header(name: str) -> bool:
    name = name.lower()
    return name.startswith("x-raft-") or name in _FORWARDED_ANSWER_HEADERS


def forward_to(api: Api, leader: str) -> bottle.HTTPResponse:
    """-forward: pass this request on to the leader and hand back its answer (its X-Raft-Outcome too), over the
    follower's keep-alive connections to the leader (forwarding.LeaderConnections). The target goes as sent, and
    with it the admin signature headers, which cover it. A request that could not be sent whole (no connection, a
    reset while sending) was not applied: the leader's edge runs nothing before a whole request has arrived. One
    sent whole but not answered may have been."""
    req = bottle.request
    headers = {FORWARDED_HEADER: api.runtime.node.node_id, "Content-Type": req.content_type or ""}
    for name in (TIMESTAMP_HEADER, SIGNATURE_HEADER):
        value = own_header(name)
        if value is not None:
            headers[name] = value
    try:
        answer = api.leader_connections.forward(api.connect, leader, req.method, wire_target(req.environ["REQUEST_URI"]),
                                                read_body(), headers, api.write_timeout_seconds + 1,
                                                leader=lambda: current_leader_http(api))
    except NotSent as e:
        api.metrics.forwards.inc("not_sent")
        api.forward_failures.log(logging.WARNING, "could not forward a %s to the leader at %s: %s; not applied",
                                 req.method, leader, e)
        return text(503, f"could not forward to the leader at {leader}: {e}; not applied",
                    **{OUTCOME_HEADER: NOT_APPLIED})
    except NoAnswer as e:
        api.metrics.forwards.inc("no_answer")
        api.forward_failures.log(logging.WARNING, "no answer from the leader at %s to a forwarded %s: %s; outcome "
                                 "unknown", leader, req.method, e)
        return text(503, f"no answer from the leader at {leader}: {e}; outcome unknown", **{OUTCOME_HEADER: UNKNOWN})
    api.metrics.forwards.inc("answered")
    keep = {k: v for k, v in answer.headers if forwarded_answer_header(k)}
    return bottle.HTTPResponse(answer.body, answer.status, keep)


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
    reason = api.guard.verify(req.method, req.environ["REQUEST_URI"], read_body(), own_header(TIMESTAMP_HEADER),
                              own_header(SIGNATURE_HEADER))
    if reason is not None:
        raise Forbidden(what, reason)


def claim_signature(api: Api, what: str) -> None:
    """On the leader, just before acting: refuse a signature already acted on (a replay), here (AdminGuard: no log
    entry for a replay to this leader) or by any leader (store.AdminClaims, through the log)."""
    if api.guard is None:
        return
    signature = own_header(SIGNATURE_HEADER)
    timestamp = own_header(TIMESTAMP_HEADER)
    if signature is None or timestamp is None:  # check_signature refused it first
        raise Forbidden(what, "not signed with this cluster's secret (no signature)")
    reason = api.guard.claim(signature)
    if reason is None:
        claim = command(ADMIN_CLAIM, signature, b"", [float(timestamp), time.time()])
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


def node_request_refusal(api: Api, what: str) -> bottle.HTTPResponse | None:
    """With a secret, a request to this node alone (GET /cluster/keys, GET /snapshot: admin.node_request_headers):
    its answer (400, 421) when it lacks its nonce or names another node; Forbidden when it is not signed; else
    None."""
    assert api.guard is not None
    req = bottle.request
    nonce, asked = own_header(NONCE_HEADER), own_header(NODE_HEADER)
    if nonce is None or not valid_nonce(nonce):
        return text(400, f"a {what} needs {NONCE_HEADER}: a fresh random nonce of 32 to 128 hex digits")
    if not asked:
        return text(400, f"a {what} needs {NODE_HEADER}: the id of the node asked")
    reason = api.guard.verify(req.method, req.environ["REQUEST_URI"], keys_request_body(nonce, asked),
                              own_header(TIMESTAMP_HEADER), own_header(SIGNATURE_HEADER))
    if reason is not None:
        raise Forbidden(what, reason)
    node_id = api.runtime.status().node.node_id
    if asked != node_id:
        return text(421, f"this is node {node_id}, not {asked}: ask the node at the address it gave")
    return None


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
        refuse_from_the_empty_state(api)
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


RESTORING = "this node is restoring a snapshot; retry"


def restoring_into_the_empty_state(runtime: Raft) -> bool:
    """Whether this node restores a snapshot into a state machine that holds nothing applied yet: its own snapshot
    at a restart (Runtime.restore_at_start: the store is a fresh one until the restore swaps the snapshot's state
    in), or a first one from the leader. A leader's snapshot restored over an older state is not: that state is
    whole, at its applied index. What counts the state (keys, leases, its feature level) says nothing meanwhile:
    the empty state's 0 and 1 are not this node's (review of fastrestore2, Q-b)."""
    return runtime.restoring_snapshot and runtime.node.last_applied == 0


def counts_nothing_yet(runtime: Raft, node: NodeStatus) -> bool:
    """Whether what counts the state (/status's keys and cluster_feature_level, /stats' keys) says null: while
    `restoring_into_the_empty_state`, and while a node that applied nothing yet (a joiner) receives its first
    snapshot from the leader, whose chunks come before the restore (review of health, Q7: it showed the empty
    state's 0 and 1, then null, then its values). `node`: the runtime's NodeStatus, taken once by the route."""
    return restoring_into_the_empty_state(runtime) or (node.receiving_snapshot and node.last_applied == 0)


def refuse_from_the_empty_state(api: Api) -> None:
    """503 (raised) while `restoring_into_the_empty_state`, for what answers without waiting for an index (a stale
    read or list, a watch from now): it would answer from the empty state, a restarted node's keys seeming gone
    for the whole restore, and a watch from now would start at 0 and get 410 at the swap (review of
    fastrestore, Q2). A read that waits for an index (linearizable, lease, ?min_index) waits for the restore."""
    if restoring_into_the_empty_state(api.runtime):
        raise text(503, RESTORING)


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
        raise text(503, RESTORING, **{"X-Raft-Outcome": "not-applied"})
    if api.store.feature_level < 2:
        raise text(409, api.upgrade_reason())


def parse_lease_id(raw: str) -> int:
    """A lease id as the API writes it: decimal digits (400 otherwise)."""
    if not (raw.isascii() and raw.isdigit() and 0 < len(raw) < 20) or int(raw) == 0:
        raise text(400, f"a lease id is a positive decimal number (as POST /lease answers it), not {raw!r}")
    return int(raw)


def ttl_seconds(api: Api) -> int:
    """?ttl=S: whole seconds, 1 to MAX_TTL_SECONDS, raised to `min_ttl_seconds` (routes_leases' rules)."""
    raw = bottle.request.query.get("ttl", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) < 12) or not 1 <= int(raw) <= MAX_TTL_SECONDS:
        raise text(400, f"ttl must be whole seconds from 1 to {MAX_TTL_SECONDS}")
    return max(int(raw), api.min_ttl_seconds)
