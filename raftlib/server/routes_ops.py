"""The operator's routes: GET /status (this node's view, read from runtime.status() only), GET /livez and GET
/readyz, GET /metrics (Prometheus's text) and GET /snapshot (a backup: ARCHITECTURE.md, "The life of a backup").

Rules:
- GET /livez and GET /readyz (raftlib.server.health) need no secret and are never forwarded; /livez reads only the
  runtime's status, /readyz too and then, once its checks pass, asks one linearizable read (READY_READ_SECONDS).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import bottle
import gevent
import prometheus_client as prom

from raftlib.core import NotLeader
from raftlib.runtime import Backup, Stopped, Timeout

from .admin import SIGNATURE_HEADER
from .edge import end_connection, waiting_on_its_own
from .health import READY_READ_SECONDS, liveness, readiness, report
from .routes_shared import (Api, Forbidden, counts_nothing_yet, json_answer, leader_http, log, members, own_header,
                            node_request_refusal, text, wait_consistent)


def get_status(api: Api) -> bottle.HTTPResponse:
    """GET /status. `restoring`: this node receives a snapshot from the leader, or restores one (the leader's, or
    its own at a restart): NodeStatus.receiving_snapshot, what GET /readyz's snapshot check fails on. It was true
    only for a restore into the empty state, so a follower installing the leader's snapshot over its own state
    said nothing of it (review of the health leftovers, item 2). While this node restores into its empty state (a
    restart's, or a joiner's first snapshot, its transfer too: `routes_shared.counts_nothing_yet`) it still answers
    (roles, indices, health), but `keys` and `cluster_feature_level` are null, which the empty state would give
    as 0 and 1 (review of fastrestore, Q2; null rather than left out, so clients that index them do not break:
    review of fastrestore2, Q-b); a leader's snapshot restored over a whole state leaves them as that state says."""
    status = api.runtime.status()
    node = status.node
    empty = counts_nothing_yet(api.runtime, node)
    return json_answer({
        "node_id": node.node_id, "role": node.role.value, "term": node.term, "leader": node.leader_id,
        "leader_http": leader_http(node.membership, node.leader_id), "commit_index": node.commit_index,
        "applied_index": node.last_applied, "last_index": node.last_index, "snapshot_index": node.snapshot_index,
        "members": members(node), "data_size": api.data_size(),
        "disk_full": status.disk_full, "uncommitted_bytes": node.uncommitted_bytes,
        "snapshot_catch_up_entries": node.catch_up_entries, "snapshot_catch_up_bytes": node.catch_up_bytes,
        "removed": node.removed and {"by": node.removed[0], "index": node.removed[1]},
        "feature_level": api.feature_level, "restoring": node.receiving_snapshot or empty,
        "keys": None if empty else len(api.store),
        "cluster_feature_level": None if empty else api.store.feature_level,
        # The election timeout in force (-election-ms, in whole ticks of -heartbeat-ms / 5): what a follower waits
        # at least for its leader, and what the lease TTL floor and the watch guard are counted in.
        "election_timeout_ms": round(status.election_timeout_seconds * 1000),
    })


def livez(api: Api) -> bottle.HTTPResponse:
    """200 `ok` while the runtime drives the node (answering at all shows the loop runs); else 503 and why
    (raftlib.server.health). ?verbose: every check."""
    checks = liveness(api.runtime.status().running)
    return health_answer("livez", checks)


def readyz(api: Api) -> bottle.HTTPResponse:
    """200 `ok` when this node is a member, knows an active leader, has room on its disk, runs its watch guard (if
    it serves watches), receives or restores no snapshot, has applied what it knows to be committed, and then a
    linearizable read (a ReadIndex round, shared with the reads waiting) completes within READY_READ_SECONDS or an
    election timeout, the longer; else 503 and why (raftlib.server.health). ?verbose: every check (the read only
    when the others passed)."""
    status = api.runtime.status()
    checks = readiness(status, time.monotonic(), api.max_watches == 0 or api.watch_guard_alive())
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



SNAPSHOT_INDEX_HEADER = "X-Raft-Snapshot-Index"
SNAPSHOT_SHA256_HEADER = "X-Raft-Snapshot-Sha256"
BACKUP_PIECE_BYTES = 1 << 20
BACKUP_SLACK_BYTES = 16 << 20  # a backup's bound on its reader counts this many bytes more (a slow start)


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
        reason = api.guard.claim(own_header(SIGNATURE_HEADER) or "")
        if reason is not None:
            raise Forbidden("backup", reason)
    wait_consistent(api)
    with waiting_on_its_own(bottle.request.environ):  # bounded by backup_timeout_seconds
        backup = api.runtime.backup(api.backup_folder, api.backup_timeout_seconds)
    log.info("backup at index %d (%d bytes, sha256 %s) for %s", backup.index, backup.size, backup.sha256,
             bottle.request.remote_addr)
    return bottle.HTTPResponse(BackupBody(backup, bottle.request.environ, api.backup_min_rate), 200, {
        "Content-Type": "application/octet-stream", "Content-Length": str(backup.size),
        SNAPSHOT_INDEX_HEADER: str(backup.index), SNAPSHOT_SHA256_HEADER: backup.sha256})


class BackupBody:
    """The backup's bytes a piece at a time; the sweeper's busy bound counts from each piece (a slow reader of a
    large backup is cut off only when it stops reading). An iterable with close(), which the WSGI server calls at
    the end or when the client goes, even before the first piece (a generator's `finally` would not run then):
    it closes the Backup, ending its count (Runtime.backup, one at a time).

    The whole answer must be taken within (size + BACKUP_SLACK_BYTES) / `min_rate` seconds from its first piece,
    else the connection is closed (logged, and counted as the eviction "backup_too_slow"): a reader that took a
    piece just often enough for the busy bound (about 13 KB/s) held the node's one backup slot, and the copy of the
    state on its disk, for as long as it liked (review edge Q3: about 22 h for 1 GB)."""

    def __init__(self, backup: Backup, environ: dict, min_rate: int) -> None:
        self.backup, self.environ, self.min_rate = backup, environ, min_rate
        self._cutoff: gevent.Greenlet | None = None

    def __iter__(self) -> Iterator[bytes]:
        seconds = (self.backup.size + BACKUP_SLACK_BYTES) / self.min_rate
        self._cutoff = gevent.spawn_later(seconds, self._cut_off, seconds)
        try:
            while piece := self.backup.file.read(BACKUP_PIECE_BYTES):
                yield piece
                with waiting_on_its_own(self.environ):
                    pass
        finally:  # read whole, or failed: Bottle peeks at the first piece and may not call close() then
            self.close()

    def close(self) -> None:
        if self._cutoff is not None:
            self._cutoff.kill(block=False)
        self.backup.close()

    def _cut_off(self, seconds: float) -> None:
        if end_connection(self.environ, "backup_too_slow"):
            log.warning("closed the backup at index %d for %s: not taken whole within %.0fs (-backup-min-rate %d "
                        "bytes a second, with %d MiB of slack)", self.backup.index, self.environ.get("REMOTE_ADDR"),
                        seconds, self.min_rate, BACKUP_SLACK_BYTES >> 20)


# (method, path, route, the operation its failures are answered as): api.make_app installs them.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("GET", "/status", get_status, "status"),
    ("GET", "/livez", livez, "status"),
    ("GET", "/readyz", readyz, "status"),
    ("GET", "/metrics", get_metrics, "status"),
    ("GET", "/snapshot", get_snapshot, "backup"),
)
