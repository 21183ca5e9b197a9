"""The wiring of one node: its data dir (DiskStorage), the Raft transport (ZmqTransport), the runtime that drives
the core, the key/value store it applies to, the metrics and the HTTP edge; joining a cluster; a graceful stop.

Rules:
- Construction opens the data dir (and holds its lock) and builds everything, but nothing runs and no port is
  bound until `start`; `stop` undoes `start` and closes the data dir, once however often it is called.
- A storage failure the runtime reports (a failed write or fsync: fsyncgate) ends the process at once with exit
  code 3, acknowledging nothing more.
- The choice of a successor on shutdown reads only `Runtime.status()`, never the core's fields.
- Every wait has a bound: joining (-join-timeout), each join request, the hand-over on shutdown, each question of
  the FeatureLevelRaiser.
- The cluster's feature level (store's rules) is raised by the leader alone, once every member (voters and
  learners) answers GET /status with a feature_level of this release's or more (FeatureLevelRaiser); this
  node's joins say its level, which a cluster of level 2 or more requires.
- With a cluster secret the node has a CURVE key pair of its own, made at its first start and kept in node.key
  (DiskStorage.write_node_key: crash-safe, mode 0600); the secret key is never logged. Its public key goes into
  the bootstrap's configuration, or into the signed join request.
- Vouched keys (raftlib.transport's rules): the leader's signed answer to the join names the members' keys and
  the index of the configuration that added this node; a member's signed answer to GET /cluster/keys names its
  newest committed configuration's keys and index. The newest such list (by index) is admitted on the Raft port
  while this node's own configuration and commit index are older, and kept in node.key ("vouched", before
  JOINING goes); once the log's configuration or the commit index reaches its index (checked every
  VOUCHED_RECHECK_SECONDS for the commit index: review of edge5, finding 2) it is dropped from node.key (review
  3 F1). The node asks for a list once at start (when it has a
  configuration with other members) and when its Raft port refuses a key that no list names, at most once every
  KEYS_REFRESH_SECONDS, doubled after each round that found nothing newer up to KEYS_REFRESH_MAX_SECONDS and back
  to KEYS_REFRESH_SECONDS once one does (review of edge5, finding 3: a removed member dialling in kept every
  member asking every 2 s): it asks its configuration's members, then the vouched list's, one at a time, each
  within KEYS_REQUEST_TIMEOUT_SECONDS, in a greenlet of its own (never in the loop's).
- Addresses: -h is resolved (getaddrinfo, IPv4) and probed with a bind before the data dir is opened; -advertise
  (default -h) is what the configuration holds and redirects name. -name NAME makes the node id NAME-<8 random
  hex> at the first start (nodestart.new_node_id: a new data dir is always a new node, review of ops,
  finding 1); another -name later is refused before anything is written.
- HTTP answers only requests whose Host is one of this node's names (raftlib.server.hosts: -allowed-hosts, against
  DNS rebinding): -h, -advertise, its configuration's members' advertised HTTP hosts, IP literals and localhost.
  This machine's names only when -allowed-hosts lists them: its FQDN is a reverse lookup a hostile resolver answers.
- -force-new-cluster (nodestart.force_new_cluster): the members it removed are fenced (node.json's
  "fenced"): while such a node is not in this node's configuration, its frames never reach the runtime and are
  answered with a Removed notice (`_deliver`).
- Leases (raftlib.server.leases): the LeaseKeeper is the leader's. LeaderLeases keeps it in step with the node's
  role and term (a new term of leadership: every lease its full TTL from now), hears the store's grants and
  removals as they apply, and every LEASE_TICK_SECONDS, while this node leads, proposes one LEASE_EXPIRE for the
  leases past their deadline (at most MAX_EXPIRE_BATCH, one proposal in flight, bounded by -write-timeout); after
  a full batch it goes on at once (a mass expiry: one entry per commit round, yielding between them).
- Watches (raftlib.server.watchguard): the WatchGuard ends them, and refuses new ones, while this node is removed or
  has heard from no leader for 3 election timeouts (at least 3 s); it runs from `start` to `stop`.
"""

from __future__ import annotations

import http.client
import math
import ipaddress
import json
import logging
import os
import random
import re
import resource
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import monkey

from raftlib.core import Config, NodeStatus, NotLeader, ProposalDropped, RaftNode
from raftlib.interfaces import StoredState
from raftlib.messages import Member, Membership, Message, Removed, Role
from raftlib.progress import best_successor as progress_best_successor
from raftlib.runtime import SNAPSHOT_LOG_RATIO, EntryLost, NotRunning, Runtime
from raftlib.storage import DiskStorage
from raftlib.storage_errors import DiskFull, OutOfDescriptors, StorageError
from raftlib.transport import FrameBudget, ZmqTransport, new_node_key, public_key_of

from .admin import (KEYS_PATH, SECRET_ENV, SIGNATURE_HEADER, AdminGuard, admin_headers, keys_request_headers,
                    parse_vouched, read_keys_answer, valid_public_key, verify_answer)
from .api import make_app
from .edge import DEFAULT_MAX_UNSENT_BYTES, EdgeServer, RateLimitedLog, listen
from .hosts import AllowedHosts
from .leases import TICK_SECONDS as LEASE_TICK_SECONDS
from .leases import LeaseKeeper
from .metrics import Metrics
from .nodestart import force_new_cluster, name_of, new_node_id, start_node
from .forwarding import LeaderConnections
from .routes_shared import BACKUP_MIN_RATE, MAX_WATCHES, Api, leader_http, restoring_into_the_empty_state
from .store import (FEATURE_LEVEL, LEASE_EXPIRE, MAX_EXPIRE_BATCH, SET_FEATURE_LEVEL, Event, KeyValueStore, check_snapshot,
                    command)
from .watch import DEFAULT_HISTORY_BYTES, DEFAULT_HISTORY_EVENTS, WatchHub
from .watchguard import WatchGuard

log = logging.getLogger("raftdzmq.node")

# Test-only (tests/faults.py), ignored unless set: RAFTDZMQ_TEST_FSYNC_DELAY_FILE names a file holding a number of
# seconds; while it exists, every log fdatasync first blocks the whole process that long, as a slow disk does.
TEST_FSYNC_DELAY_FILE = os.environ.get("RAFTDZMQ_TEST_FSYNC_DELAY_FILE")
# Test-only (tests/test_coord_api.py): RAFTDZMQ_FEATURE_LEVEL=1 makes this node report (and join with, and never
# raise the cluster beyond) feature level 1, as a node of an older release would; it applies commands as this
# release does. Never set it in production.
TEST_FEATURE_LEVEL_ENV = "RAFTDZMQ_FEATURE_LEVEL"
# Test-only (tests/fault_coord.py): RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET=1 removes the full-TTL reset a new leader
# gives every lease (leases.py's rules), so that the fault runs show their lease check catches it. Never set it.
TEST_UNSAFE_LEASE_NO_RESET = os.environ.get("RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET") == "1"
# The feature level from which every member reads AppendEntriesReply.restoring (this release's: the field came
# with it), so a restoring node says it in its append replies (core.Config.restoring_in_replies).
RESTORING_IN_REPLIES_LEVEL = 3
LEVEL_CHECK_SECONDS = 1.0  # how often a leader of a cluster below this release's level asks the members theirs
LEVEL_ROLE_CHECK_SECONDS = 0.1  # how often the raiser looks whether this node leads (cheap: no I/O)
LEVEL_REQUEST_TIMEOUT_SECONDS = 1.0  # each member asked gets this long to answer
HEARTBEAT_TICKS = 5  # ticks per heartbeat: the election timeout is counted in fifths of a heartbeat
HANDOVER_TIMEOUT_SECONDS = 2.0  # how long a stopping leader waits for its successor to take over
FORWARD_POOL_CHECK_SECONDS = 0.5  # how often -forward's pool is told which leader this node knows (keep_only)
MIN_HARD_DESCRIPTORS = 1024  # a hard ulimit -n under this is warned about at start
KEYS_REFRESH_SECONDS = 2.0  # at most one round of GET /cluster/keys this often (a stranger's refusals cause them)
KEYS_REFRESH_MAX_SECONDS = 30.0  # the pause between rounds doubles up to this while they find nothing newer
VOUCHED_RECHECK_SECONDS = 1.0  # how often the vouched list is checked against the commit index
JOINED_POLL_SECONDS = 0.1  # how often a node whose join was accepted looks for a leader's term saved in its log
KEYS_REQUEST_TIMEOUT_SECONDS = 1.0  # each member asked gets this long to answer
MAX_KEYS_ANSWER_BYTES = 1 << 20  # -max-members 64 members take about 10 KiB
EXPIRY_REFUSAL_LOG_SECONDS = 5.0  # a lease expiry refused (never appended) is logged at most this often


class KeysRefresh:
    """When the next round of GET /cluster/keys may start: `first_seconds` after the last one began, doubled for
    each round in a row that found nothing newer after the first (2, 4, 8, 16 s), at most `most_seconds`, and
    back to `first_seconds` after a round that did (review of edge5, finding 3). Pure: the caller passes the time
    (time.monotonic())."""

    def __init__(self, first_seconds: float = KEYS_REFRESH_SECONDS, most_seconds: float = KEYS_REFRESH_MAX_SECONDS
                 ) -> None:
        assert 0 < first_seconds <= most_seconds
        self.first_seconds, self.most_seconds = first_seconds, most_seconds
        self.pause_seconds = first_seconds
        self._fruitless_rounds = 0
        self._started_at: float | None = None

    def due(self, now: float) -> bool:
        """Whether a round may start at `now`; if so, it counts as started."""
        if self._started_at is not None and now - self._started_at < self.pause_seconds:
            return False
        self._started_at = now
        return True

    def round_done(self, found_newer: bool) -> None:
        self._fruitless_rounds = 0 if found_newer else self._fruitless_rounds + 1
        doublings = min(max(self._fruitless_rounds - 1, 0), 32)
        self.pause_seconds = min(self.first_seconds * 2 ** doublings, self.most_seconds)


@dataclass(frozen=True)
class ServerConfig:
    """A node's settings (the command's flags; README, "Flags")."""

    data_dir: str
    host: str = "localhost"  # bound and advertised
    port: int = 5555  # Raft (ZeroMQ)
    http_port: int = 8080
    join: str | None = None  # host:httpport of a member, for a node not yet in a cluster
    forward: bool = False
    heartbeat_ms: float = 50.0
    election_ms: float = 1000.0  # etcd's default (issue 13: a loaded machine deposed leaders at 300)
    write_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 5.0
    join_timeout_seconds: float = 10.0
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 32 << 10
    max_connections: int = 1000
    max_unsent_bytes: int = DEFAULT_MAX_UNSENT_BYTES  # -max-unsent-bytes: raftlib.server.edge.EdgeServer.hold
    idle_timeout_seconds: float = 60.0
    receive_timeout_seconds: float = 10.0
    snapshot_threshold_bytes: int = 16 << 20
    snapshot_log_ratio: float = SNAPSHOT_LOG_RATIO  # -snapshot-log-ratio: raftlib.runtime.SNAPSHOT_LOG_RATIO
    snapshot_mode: str | None = None  # -snapshot-mode: raftlib.runtime.SNAPSHOT_MODES (None: its default, "stepped")
    max_uncommitted_bytes: int = 64 << 20  # -max-uncommitted-bytes: raftlib.core.Config.max_uncommitted_bytes
    max_batch_bytes: int = Config.max_batch_bytes  # -max-batch-bytes: raftlib.core.Config.max_batch_bytes
    # -snapshot-catch-up-entries: raftlib.core.Config.snapshot_catch_up_entries
    snapshot_catch_up_entries: int = Config.snapshot_catch_up_entries
    secret: bytes | None = None
    max_members: int = 64  # a join beyond this many voters and learners is refused (409)
    fsync: bool = True  # False: UNSAFE, for experiments only
    watch_history_events: int = DEFAULT_HISTORY_EVENTS  # -watch-history: events kept for watches
    watch_history_bytes: int = DEFAULT_HISTORY_BYTES  # -watch-history-bytes: and at most about this many bytes
    access_log: bool = False  # a line per HTTP request at INFO on raftdzmq.access (-v)
    force_new_cluster: bool = False  # lost-quorum recovery: this member alone becomes the cluster (storage's rules)
    force_again: bool = False  # -force-new-cluster-again: even though this node was forced before (storage's rules)
    name: str | None = None  # -name: this node's id at its first start (random when None), checked at every start
    advertise: str | None = None  # -advertise: the host peers and clients reach this node at (default: `host`)
    allowed_hosts: tuple[str, ...] = ()  # -allowed-hosts: more names a request's Host may give ("*": any)
    backup_min_rate: int = BACKUP_MIN_RATE  # -backup-min-rate: bytes a second a backup's reader must take on average

    @property
    def advertised_host(self) -> str:
        return self.advertise or self.host


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a node id: safe in a URL path, a log line, JSON
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def resolve_host(host: str) -> str:
    """The IPv4 address `host` (a name or an address) binds to: zmq binds only addresses and interface names, so a
    host name is resolved before either port is bound. Raises CannotStart with one line when it cannot be."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise CannotStart(f"cannot resolve the host {host!r} to bind (-h): {e}") from None
    address = str(infos[0][4][0])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # before the data dir is touched
        try:
            probe.bind((address, 0))
        except OSError as e:
            raise CannotStart(f"cannot bind to {host} ({address}, -h): {e.strerror}: not an address of this "
                              "host") from None
    return address


def check_ports_free(address: str, host: str, ports: tuple[int, ...]) -> None:
    """Raise CannotStart with one line when another process holds one of `ports` on `address`. Called before the
    data dir is given an identity: a node that wrote its id and addresses (and bootstrapped a configuration naming
    them) and only then failed to bind would be known by the busy ports' addresses when started again on others.
    The probe binds as both listeners do (SO_REUSEADDR: a port left in TIME_WAIT by a stopped node is free)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as e:
                raise CannotStart(f"cannot listen on {address} (-h {host}), port {port}: {e.strerror}") from None


def own_feature_level() -> int:
    """This node's feature level: FEATURE_LEVEL, unless a test lowered it (TEST_FEATURE_LEVEL_ENV)."""
    try:
        return min(max(int(os.environ.get(TEST_FEATURE_LEVEL_ENV, FEATURE_LEVEL)), 1), FEATURE_LEVEL)
    except ValueError:
        return FEATURE_LEVEL


class FeatureLevelRaiser:
    """On the leader, raises the cluster's feature level (store's rules) to this node's: while this node leads and
    the state's level is below, at once on becoming leader and then every LEVEL_CHECK_SECONDS, it asks each other
    member's GET /status (within LEVEL_REQUEST_TIMEOUT_SECONDS each, all at once) and, when every one reports a
    feature_level of this node's or more, proposes SET_FEATURE_LEVEL. The questions are asked without the
    membership lock that joins take (routes_cluster.join): a member slow to answer never holds up a join. The raise is
    proposed under that lock, and only if the configuration then is the one the members were asked in (the same
    term and configuration index: any change since, a removal and a join again of the same id and addresses
    included, means no raise this round), so no node of an older release joins between the question and the
    raise (one that joined meanwhile is asked next round). The proposal carries that term and configuration index
    (Runtime.propose's `configuration`): the runtime drops it if another configuration reached the log first (a
    join whose change timed out, releasing the lock, while its change still waited in the runtime's inbox).
    `laggards` holds the last round's members below the level (or that did not answer), for the 409s."""

    def __init__(self, runtime: Runtime, store: KeyValueStore, level: int, lock, write_timeout_seconds: float,
                 connect=http.client.HTTPConnection) -> None:
        self.runtime, self.store, self.level, self.lock = runtime, store, level, lock
        self.write_timeout_seconds = write_timeout_seconds
        self.connect = connect
        self.laggards: dict[str, str] = {}  # node id -> "feature level 1" or "no answer"
        self._stopping = False

    def reason(self) -> str:
        """Why the new API is refused: the 409's text."""
        if self.level < FEATURE_LEVEL:
            return "the cluster is not upgraded yet: its leader runs an older raftdzmq"
        if self.runtime.node.role is not Role.LEADER:  # only the leader asks the members
            return (f"the cluster is not upgraded yet (feature level {self.store.feature_level}): a member may run "
                    "an older raftdzmq; the leader's answer names it")
        older = sorted(n for n, why in self.laggards.items() if why != "no answer")
        silent = sorted(n for n, why in self.laggards.items() if why == "no answer")
        if older:
            return (f"the cluster is not upgraded yet: members {', '.join(older)} run an older raftdzmq"
                    + (f" (and {', '.join(silent)} did not answer)" if silent else ""))
        if silent:
            return f"the cluster is not upgraded yet: members {', '.join(silent)} did not answer which raftdzmq they run"
        return f"the cluster's feature level is being raised to {self.level}; retry shortly"

    def run(self) -> None:
        while not self._stopping:
            if self.runtime.node.role is not Role.LEADER or self.store.feature_level >= self.level:
                gevent.sleep(LEVEL_ROLE_CHECK_SECONDS)
                continue
            try:
                self.raise_once()
            except Exception as e:  # NotLeader, Timeout, ...: the next round tries again
                log.info("could not raise the cluster's feature level to %d yet: %s", self.level, e)
            gevent.sleep(LEVEL_CHECK_SECONDS)

    def stop(self) -> None:
        self._stopping = True

    def raise_once(self) -> bool:
        """One round: ask every other member, without the membership lock (a join never waits for a member's
        answer: a member that does not answer held every join for the round's bound); then, under the lock,
        propose the raise only if this node still leads in the term it asked in and its configuration is still
        the one it asked (the same configuration index: a node that joined meanwhile, under the lock, was not
        asked, and one removed and joined again under the same id and addresses may run another release now:
        the next round asks them; the proposal carries that configuration, checked again as it is appended).
        True once raised."""
        node = self.runtime.node
        asked_in = (node.current_term, node.membership_index)  # a leader's log only grows within its term
        others = [m for m in node.membership.members if m.node_id != node.node_id]
        asked = {m.node_id: gevent.spawn(self._level_of, m.http_address) for m in others}
        gevent.joinall(list(asked.values()), timeout=2 * LEVEL_REQUEST_TIMEOUT_SECONDS)
        laggards = {}
        for node_id, greenlet in asked.items():
            level = greenlet.value if greenlet.successful() else None
            if level is None:
                greenlet.kill(block=False)
                laggards[node_id] = "no answer"
            elif level < self.level:
                laggards[node_id] = f"feature level {level}"
        self.laggards = laggards
        if laggards or not self._may_raise():
            return False
        if not self.lock.acquire(timeout=self.write_timeout_seconds):
            return False
        try:
            node = self.runtime.node
            if (node.current_term, node.membership_index) != asked_in:  # asked again in the next round
                log.info("not raising the feature level yet: the configuration changed since the question "
                         "(term, configuration index %s, now %s)", asked_in, (node.current_term, node.membership_index))
                return False
            if not self._may_raise():
                return False
            _, result = self.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", self.level),
                                             self.write_timeout_seconds, configuration=asked_in)
            log.info("raised the cluster's feature level to %d (%s)", self.level, result)
            return self.store.feature_level >= self.level
        finally:
            self.lock.release()

    def _may_raise(self) -> bool:
        return self.runtime.node.role is Role.LEADER and self.store.feature_level < self.level

    def _level_of(self, address: str) -> int | None:
        """The feature_level a member's GET /status reports (1 when it names none: a release before them); None
        when it does not answer in time."""
        if not address:
            return None
        host, port = address.rsplit(":", 1)
        conn = self.connect(host, int(port), timeout=LEVEL_REQUEST_TIMEOUT_SECONDS)
        try:
            with gevent.Timeout(LEVEL_REQUEST_TIMEOUT_SECONDS, OSError("no whole answer in time")):
                conn.request("GET", "/status")
                resp = conn.getresponse()
                body = resp.read(1 << 20)
            if resp.status != 200:
                return None
            level = json.loads(body).get("feature_level", 1)
            return level if type(level) is int else None
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as e:
            log.debug("no feature level from %s: %s", address, e)
            return None
        finally:
            conn.close()


class WatchedStore(KeyValueStore):
    """The node's store: its events go to the watch hub, and so does each restore of a snapshot (which produces
    no events: watch.py's rules), with the snapshot's index. `snapshot_of_node` gives the core's snapshot, which
    is the one being restored whenever restore is called: at start, and by the runtime for a snapshot the leader
    sent (RaftNode._restore sets it before the Ready that carries it)."""

    def __init__(self, hub: WatchHub, snapshot_of_node: Callable[[], Any],
                 on_level_raised: Callable[[int], None] | None = None) -> None:
        super().__init__(on_event=hub.on_event, on_level_raised=on_level_raised)
        self.hub, self.snapshot_of_node = hub, snapshot_of_node

    def apply(self, index: int, command: bytes) -> object:
        result = super().apply(index, command)
        self.hub.applied(index)  # its events are in: a quiet watcher's position may move past it
        return result

    def _hand_over(self, index: int, events: list[Event]) -> None:
        """An entry's events to the hub in one call (WatchHub.on_events: its bookkeeping once per entry, not per
        key). A failure is logged and the state stays applied whole; the history may then lack some of the
        entry's events, or some watchers may not have been told of them, while `applied` moves every quiet
        watcher past the entry: a watcher would skip them with no error. So the hub is told as of a restore at
        `index` (WatchHub.restored: the history starts after the entry and every watcher is marked), and each
        watcher behind it gets a 410 Behind at its next read, never an empty one.

        It calls the hub, not `self.on_event`: the on_event given to KeyValueStore (hub.on_event, one event) is what
        makes the store collect events at all, and the per-event form of this same call (WatchHub.on_event is
        on_events of one); nothing replaces it on a node's store."""
        try:
            self.hub.on_events(events)
        except Exception:
            log.exception("the watch history failed on the %d events of index %d (the state is applied whole; "
                          "every watch behind it is ended with 410)", len(events), index)
            try:
                self.hub.restored(index, force=True)
            except Exception:  # the same code failing again: the replicated state never depends on a watcher
                log.exception("the watch history failed again at index %d: every watch is ended", index)
                self.hub.end_every_watch(index)

    def restoring(self, data) -> Iterator[bool]:
        """KeyValueStore.restoring (which `restore` runs too), telling the hub at the step that replaces the state:
        a follower restores a leader's snapshot a batch per drive (raftlib.runtime), and its watchers must hear of
        it then, before the entries after the snapshot are applied, or they would go on from a state they never
        saw (a gap). Not a generator itself: KeyValueStore.restoring notes the snapshot's level now, at the call
        (review restoreedges L2: as a generator this deferred it to the first step, which a restart's
        Runtime.restore_at_start takes only after its first drive's replies went out, so they did not say
        `restoring`, `_members_read_restoring`, and a hand-over in that window could pick this node)."""
        snapshot = self.snapshot_of_node()
        assert snapshot is not None and (snapshot.data is data or snapshot.data == data), \
            "a restore of a snapshot the core does not hold"
        return self._telling_the_hub(super().restoring(data), snapshot.last_included_index)

    def _telling_the_hub(self, steps: Iterator[bool], index: int) -> Iterator[bool]:
        """`restoring`'s generator: `steps`, the hub told of the snapshot at `index` at the step that replaces the
        state."""
        for replaced in steps:
            if replaced:
                self.hub.restored(index)
            yield replaced


class LeaderLeases:
    """The leader's side of leases (the module's rules): the LeaseKeeper in step with the node, and its ticks."""

    def __init__(self, runtime: Runtime, store: KeyValueStore, metrics: Metrics, write_timeout_seconds: float,
                 clock=time.monotonic) -> None:
        self.runtime, self.store, self.metrics = runtime, store, metrics
        self.write_timeout_seconds = write_timeout_seconds
        self.clock = clock
        self.keeper = LeaseKeeper(MAX_EXPIRE_BATCH, unsafe_no_reset_on_election=TEST_UNSAFE_LEASE_NO_RESET)
        if TEST_UNSAFE_LEASE_NO_RESET:
            log.warning("RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET: a new leader does not give leases their full TTL (tests)")
        self._stopping = False
        # A refusal lasts (the leader holds -max-uncommitted-bytes, a transfer, a full disk) and the tick retries
        # every LEASE_TICK_SECONDS: said once every few seconds, with a count of the expiries left unsaid.
        self._not_applied_log = RateLimitedLog("expiries not applied", log, EXPIRY_REFUSAL_LOG_SECONDS, clock)
        store.on_lease = self.on_lease

    def on_lease(self, lease_id: int, ttl_seconds: int | None) -> None:
        """The store's hook, as grants and removals apply (in the runtime's loop: no blocking)."""
        if ttl_seconds is None:
            self.keeper.removed(lease_id)
        else:
            self.keeper.granted(lease_id, ttl_seconds, self.clock())

    def current(self) -> LeaseKeeper | None:
        """The keeper, in step with the node's role and term; None unless this node leads."""
        node = self.runtime.node
        if node.role is not Role.LEADER:
            if self.keeper.leading:
                self.keeper.step_down()
            return None
        if self.runtime.restoring_snapshot:
            # Elected while restoring a leader's snapshot (final review, F1): the store still holds the old lease
            # table, and the swap tells nobody which leases appeared or vanished. The keeper is built from the
            # snapshot's table once it is in; keepalives meanwhile are refused (their read waits for it anyway).
            return None
        if self.keeper.term != node.current_term:
            # A new term of leadership: another leader may have answered keepalives since this node last led.
            self.keeper.become_leader(node.current_term, ((i, lease.ttl_seconds) for i, lease in self.store.leases.items()),
                                      self.clock())
        return self.keeper

    def run(self) -> None:
        pause_seconds = LEASE_TICK_SECONDS
        while not self._stopping:
            gevent.sleep(pause_seconds)
            try:
                more = self.tick()
            except Exception:
                log.exception("the lease tick failed")
                more = False
            # A full batch committed: more leases may be past their deadline (a mass expiry: review of lease, R4).
            # Go on at once, still one entry in flight at a time (each waits for its commit) and yielding between
            # them, rather than 128 leases every 100 ms.
            pause_seconds = 0 if more else LEASE_TICK_SECONDS

    def stop(self) -> None:
        self._stopping = True

    def tick(self) -> bool:
        """Propose the expiry of the leases past their deadline, if this node leads (one entry, then wait). True
        when a full batch committed: more may be due at once."""
        keeper = self.current()
        if keeper is None:
            return False
        due = keeper.due(self.clock())
        if not due:
            return False
        try:
            self.runtime.propose(command(LEASE_EXPIRE, "", b"", due), self.write_timeout_seconds)
        except (NotLeader, ProposalDropped, EntryLost, NotRunning, DiskFull) as e:
            # This entry surely not applied (never appended, or another entry took its index): open to keepalives
            # again, unless an earlier entry of this term for them timed out (the keeper's doubt: it may commit).
            self._not_applied_log.log(logging.INFO, "the expiry of %d leases was not applied (%s)", len(due), e)
            keeper.expire_failed(due)
            for _ in due:
                self.metrics.lease_expirations.inc("failed")
            return False
        except Exception as e:
            # Timeout, Stopped...: the entry may still commit. Never answer a keepalive for these in this term
            # (review of lease, R1: its keys would vanish right after the 200); propose them again.
            log.info("the expiry of %d leases is not confirmed (%s): proposing it again", len(due), e)
            keeper.expire_unknown(due)
            for _ in due:
                self.metrics.lease_expirations.inc("unknown")
            return False
        # The entry stops at the bound of keys per entry (store: "Bounded work"): the leases it left are due again.
        left = [i for i in due if i in self.store.leases]
        keeper.expire_failed(left)
        for _ in range(len(due) - len(left)):
            self.metrics.lease_expirations.inc("committed")
        return len(due) == keeper.max_batch


class JoinFailed(Exception):
    """This node could not join the cluster: refused, or no answer within -join-timeout."""


class CannotStart(Exception):
    """This data dir cannot run with the settings given (the command exits with code 2 and this one line)."""


def keyless_members(stored: StoredState) -> list[str]:
    """The members of the newest configuration in `stored` (the log's, else the snapshot's) that have no CURVE
    public key; [] when there is no configuration yet."""
    membership = stored.snapshot.membership if stored.snapshot is not None else None
    for entry in reversed(stored.entries):
        if entry.membership is not None:
            membership = entry.membership
            break
    if membership is None:
        return []
    return [node_id for node_id in membership.node_ids
            if not getattr(membership.member(node_id), "public_key", "")]


class Server:
    """One node (see the module's rules). `bootstrapped`, `must_join` and `joined_before` say what its data dir held
    at start (nodestart.start_node)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        if config.advertise is None and config.host in WILDCARD_HOSTS:
            raise CannotStart(f"-h {config.host} binds every address; say which one peers and clients reach this node "
                              "at with -advertise HOST")
        self.bind_host = resolve_host(config.host)
        self.raft_address = f"{config.advertised_host}:{config.port}"
        self.http_address = f"{config.advertised_host}:{config.http_port}"
        self.metrics = Metrics()
        self.storage = DiskStorage(config.data_dir, fsync=config.fsync, fdatasync=self._timed_fdatasync)
        try:
            stored = self._start_node()
        except BaseException:
            self.storage.close()
            raise
        tick_seconds = config.heartbeat_ms / 1000.0 / HEARTBEAT_TICKS
        raft_config = Config(node_id=self.node_id, heartbeat_ticks=HEARTBEAT_TICKS,
                             election_ticks=max(2, int(config.election_ms / 1000.0 / tick_seconds)),
                             max_uncommitted_bytes=config.max_uncommitted_bytes,
                             max_batch_bytes=config.max_batch_bytes,
                             snapshot_catch_up_entries=config.snapshot_catch_up_entries,
                             restoring_in_replies=self._members_read_restoring)
        # A new cluster's first node (a bootstrap, or a backup restored: a new node id) campaigns at its first tick,
        # its restore done (it has heard from no one: RaftNode's rules), so the README's first write does not wait
        # an election timeout for a leader. A restart, or -force-new-cluster, waits one.
        self.node = RaftNode(raft_config, random.Random(), stored.hard_state, stored.raft_log(), stored.snapshot,
                             bootstrapped=self.bootstrapped or bool(self.restored))
        self.watch_hub = WatchHub(config.watch_history_events, config.watch_history_bytes)
        # The raise of the feature level asks for a snapshot at once (store's rules, "Downgrades").
        self.store = WatchedStore(self.watch_hub, lambda: self.node.snapshot,
                                  on_level_raised=lambda level: self.runtime.request_snapshot())
        self.transport = ZmqTransport(self.node_id, f"{self.bind_host}:{config.port}", self._deliver,
                                      reply_timeout_seconds=max(0.2, config.election_ms / 1000.0),
                                      node_key=None if self.node_key is None else self.node_key["secret_key"],
                                      members=lambda: self.node.membership.members,
                                      configuration_index=self.configuration_index,
                                      on_vouched_dropped=self._forget_vouched, on_refused=self._key_refused,
                                      commit_index=lambda: self.node.commit_index,
                                      frame_budget=FrameBudget.for_batches(raft_config.max_batch_bytes,
                                                                           raft_config.max_batch_entries))
        self._keys_refresh = KeysRefresh()
        self._fence_checked_at = self._fence_logged_at = float("-inf")
        self._fence_index = 0
        self._keys_asking = False
        self._vouched_watch: gevent.Greenlet | None = None
        self._joined_watch: gevent.Greenlet | None = None
        if self.node_key is not None and self.node_key.get("vouched"):
            vouched = self.node_key["vouched"]
            if not self.transport.vouch(vouched["index"], vouched["members"]):
                self._forget_vouched()  # our configuration reached it before a crash: the list is stale
        self.runtime = Runtime(self.node, self.storage, self.transport, self.store, tick_seconds=tick_seconds,
                               snapshot_threshold_bytes=config.snapshot_threshold_bytes, on_fatal=self._fatal,
                               snapshot_mode=config.snapshot_mode, snapshot_log_ratio=config.snapshot_log_ratio)
        if stored.snapshot is not None:  # a piece per drive once the runtime runs: heartbeats answered meanwhile
            self.runtime.restore_at_start(stored.snapshot)
        self.metrics.bind(self.runtime.status)
        self.metrics.lease_count = self.lease_count
        self.leases = LeaderLeases(self.runtime, self.store, self.metrics, config.write_timeout_seconds)
        self.watch_guard = WatchGuard(self.runtime.status, self.watch_hub)
        self.http: EdgeServer | None = None
        self.feature_level = own_feature_level()
        self.level_raiser: FeatureLevelRaiser | None = None
        self.leader_connections: LeaderConnections | None = None  # -forward's pool, once HTTP is set up
        self._stopping = False

    def lease_count(self) -> int | None:
        """The raftdzmq_leases gauge: the store's leases; None (no sample) while the store is the empty one a restart
        restores into, whose 0 is not this node's (review of fastrestore2, Q-b)."""
        return None if restoring_into_the_empty_state(self.runtime) else len(self.store.leases)

    def _members_read_restoring(self) -> bool:
        """Whether the cluster's feature level says every member reads AppendEntriesReply.restoring. While this
        node restores a snapshot into its empty store (level 1: its own at a restart, or a joiner's first from the
        leader) that snapshot's level stands in (store.restoring_level: the cluster's when it was taken; a level
        never goes down). Review of fix2snap, L1: a joiner counted only its own snapshot's, so it never said it.

        A node restoring a snapshot that predates level 3 in a cluster already raised to it does not say it (review
        of the health leftovers, item 3): the raise is in entries it has not applied (if it holds them at all), so
        it cannot know that its leader reads the field, and its leader cannot tell its replies from a restored
        node's (they undo the guess of Progress.snapshot_done too). Left so, as bounded and harmless:
        - Once per cluster: it lasts until the node's first snapshot at level 3, which each node takes as it
          applies the raise (on_level_raised: request_snapshot). Only a node that restarts, or is sent its leader's
          snapshot, between the raise and that snapshot restores one of an older level.
        - What it costs is a successor chosen during that restore (a graceful stop's hand-over, POST
          /cluster/transfer): it ignores TimeoutNow, so the leader aborts the transfer after an election timeout
          (writes refused, not applied, until then; the route answers 503), and a stopping leader stops after
          HANDOVER_TIMEOUT_SECONDS, its followers electing one an election timeout later, as after a crash.
        - Safety does not rest on it: the field only steers the choice of a successor.
        Saying it anyway would make a leader of an older release drop the whole frame (raftlib.codec), and the
        node's replication would stall for as long as it restores: worse than the gap."""
        return max(self.store.feature_level, self.store.restoring_level) >= RESTORING_IN_REPLIES_LEVEL

    def _start_node(self) -> StoredState:
        """Load the data dir, then settle its identity, the JOINING marker and the bootstrap, crash-safe
        (nodestart.start_node says how)."""
        stored = self.storage.load()
        if stored.snapshot is not None:
            try:  # restored by steps once the node runs (Runtime.restore_at_start): what it would refuse, now
                check_snapshot(stored.snapshot.data)
            except ValueError as e:
                raise CannotStart(f"{self.config.data_dir}: its snapshot at index "
                                  f"{stored.snapshot.last_included_index}: {e}") from None
        identity = self.storage.read_identity()
        name = self.config.name
        if name is not None and identity is not None and \
                name not in (identity.get("name"), identity.get("node_id"), name_of(str(identity.get("node_id")))):
            raise CannotStart(f"{self.config.data_dir} is node {identity.get('node_id')}, not -name {name}: a node's "
                              "id never changes (start it with its own name, or without -name)")
        if self.config.force_new_cluster and stored.hard_state.current_term == 0 and stored.last_index == 0:
            raise CannotStart(f"-force-new-cluster needs the data dir of a member of a cluster; {self.config.data_dir} "
                              "has never been in one")
        check_ports_free(self.bind_host, self.config.host, (self.config.port, self.config.http_port))
        if self.config.secret is not None:
            self._refuse_keyless(stored)
        self.node_key = None if self.config.secret is None else self._load_node_key()
        start = start_node(self.storage, stored, new_node_id(name), self.raft_address,
                           self.http_address, join=bool(self.config.join), public_key=self.public_key, name=name)
        self.node_id = start.node_id
        # Members removed by -force-new-cluster: their messages are dropped while they are not members (_deliver).
        self.fenced = self.storage.fenced()
        self.bootstrapped, self.must_join, self.joined_before = start.bootstrapped, start.must_join, start.joined_before
        self.restored = start.restored
        if start.restored:
            log.warning("installed the restored backup at index %d: a new one-node cluster of node %s (other nodes "
                        "join it with -join)", start.restored, self.node_id)
        if not self.config.force_new_cluster:
            return start.stored
        me = Member(self.node_id, self.raft_address, self.http_address, self.public_key)
        forced = force_new_cluster(self.storage, start.stored, me, again=self.config.force_again)
        if forced is None:
            log.warning("-force-new-cluster: this node is its cluster's only member already; starting normally "
                        "(remove the flag)")
            return start.stored
        index, removed = forced
        self.fenced = self.storage.fenced()
        log.warning("-force-new-cluster: node %s is now a one-node cluster (its configuration at index %d, term %d); "
                    "removed members %s: never start them again on their old data dirs; add fresh nodes with -join",
                    self.node_id, index, self.storage.state.hard_state.current_term, ", ".join(removed))
        return StoredState(self.storage.state.hard_state, self.storage.state.snapshot,
                           list(self.storage.state.entries))

    def _refuse_keyless(self, stored: StoredState) -> None:
        """With a secret, a configuration whose members lack node keys cannot run: those members can neither be
        admitted nor called, and the cluster would wedge silently (review 3 F3: pre-candidates forever, or a
        single leader whose joiners are never admitted). Checked before node.key is made: the data dir is left as
        it was."""
        keyless = keyless_members(stored)
        if keyless:
            raise CannotStart(
                f"the configuration in {self.config.data_dir} has members without a node key ({', '.join(keyless)}): "
                "it was made by a raftdzmq before node keys, or without a secret, and a cluster with a secret cannot "
                "run on it; recreate the cluster with this version (dump the keys over HTTP and load them into the "
                "new one), or run this one without a secret")

    @property
    def public_key(self) -> str:
        """This node's CURVE public key (Z85 text); "" without a cluster secret."""
        return "" if self.node_key is None else public_key_of(self.node_key["secret_key"])

    def _load_node_key(self) -> dict:
        """node.key: this node's CURVE secret key and the vouched list it admits while its configuration is older
        (an "admit" list of the version before is the join's, read as vouched at index 1); made (with a
        new key) when the data dir has none. Before node.json at a first start: a crash between leaves a key and
        no identity, which the next start keeps."""
        key = self.storage.read_node_key()
        if key is None:
            key = {"format": 1, "secret_key": new_node_key()}
            self.storage.write_node_key(key)
            log.info("made a CURVE key pair for this node (public key in the configuration; secret key in %s)",
                     os.path.join(self.config.data_dir, "node.key"))
            return key
        try:
            public_key_of(key.get("secret_key", ""))
            admit = key.pop("admit", None)
            if admit:  # the version before vouched lists: the join's keys, kept while there was no configuration
                key.setdefault("vouched", {"index": 1, "members": admit, "http_addresses": {}})
            vouched = key.get("vouched")
            if vouched is not None:
                index, members = vouched["index"], vouched["members"]
                if (not isinstance(index, int) or index < 1 or not isinstance(members, dict)
                        or not all(valid_public_key(v) for v in members.values())
                        or not isinstance(vouched.get("http_addresses", {}), dict)):
                    raise ValueError('bad "vouched"')
        except (ValueError, AttributeError, KeyError, TypeError) as e:
            raise StorageError(f"{os.path.join(self.config.data_dir, 'node.key')} is not a node key: {e}") from None
        return key

    def configuration_index(self) -> int:
        """The index of the newest configuration in the log; the snapshot's index when the log holds none (the
        snapshot's configuration was made at or before it); 0 when there is none. O(entries in memory): for the
        rare moments that need it (a change of configuration, a vouched list, a keys request)."""
        entries = self.node.log.membership_entries()
        return entries[-1].index if entries else self.node.log.snapshot_index

    def committed_configuration(self) -> tuple[int, Membership] | None:
        """The newest committed configuration and its index: the last configuration entry at or below the commit
        index, else the snapshot's (made at or before its index, which is committed); None when there is neither
        (review of edge5, finding 2: GET /cluster/keys answered an uncommitted configuration, which may be cut
        off). O(entries in memory), as configuration_index."""
        commit_index = self.node.commit_index
        committed = [e for e in self.node.log.membership_entries() if e.index <= commit_index]
        if committed:
            assert committed[-1].membership is not None
            return committed[-1].index, committed[-1].membership
        snapshot = self.node.snapshot
        return None if snapshot is None else (snapshot.last_included_index, snapshot.membership)

    def _forget_vouched(self) -> None:
        """The log reached the vouched list's index (durable: the runtime syncs the peers after the save, and at
        start it was loaded from disk): drop the list from node.key, crash-safe, so no later start admits it
        (review 3 F1). No room or no descriptor: the transport has forgotten it already, and the next start, which
        finds the configuration again, drops it; any other failure of the write is fatal (storage's rules)."""
        assert self.node_key is not None
        if "vouched" not in self.node_key:
            return
        self.node_key = {k: v for k, v in self.node_key.items() if k != "vouched"}
        try:
            self.storage.write_node_key(self.node_key)
        except StorageError as e:
            log.warning("could not drop the vouched keys from node.key (%s); they are not admitted, and the next "
                        "start drops them", e)
            return
        log.info("the log reached the configuration of the vouched keys: node.key no longer lists them")

    def _vouch(self, index: int, members: dict[str, str], http_addresses: dict[str, str]) -> bool:
        """Admit a vouched list (verified) if it is newer than the configuration and the list we have, and keep it
        in node.key. True when taken."""
        assert self.node_key is not None
        members = {k: v for k, v in members.items() if k != self.node_id}
        if not self.transport.vouch(index, members):
            return False
        self.node_key = {**self.node_key, "vouched": {"index": index, "members": members,
                                                      "http_addresses": http_addresses}}
        self.storage.write_node_key(self.node_key)
        return True

    def _watch_vouched(self) -> None:
        """Every VOUCHED_RECHECK_SECONDS, drop the vouched list once the commit index has reached its index (the
        transport sees configuration changes, not commits: review of edge5, finding 2)."""
        while not self._stopping:
            gevent.sleep(VOUCHED_RECHECK_SECONDS)
            try:
                self.transport.recheck_vouched()
            except Exception:
                log.exception("checking the vouched list against the commit index failed")

    def _mark_joined_once_reached(self) -> None:
        """Write node.json's "joined" once this node's log holds a term (a leader reached it and the save was
        fsynced): from then on a start that finds no term in log/ is refused (nodestart.LogMissing), since the node
        may have voted or acknowledged entries. A start that finds a term writes it too (nodestart.start_node),
        so a crash between the save and this write loses nothing. No room or no descriptor (nothing changed): tried
        again. Any other error is fatal (fsyncgate: a retry's folder fsync through the same handle would return 0
        after an EIO it reported once: review r30)."""
        while not self._stopping:
            if self.storage.state.hard_state.current_term > 0:
                try:
                    self.storage.mark_joined()
                    return
                except (DiskFull, OutOfDescriptors) as e:  # if never written, the next start writes it
                    log.warning("could not note in node.json that this node joined: %s; trying again", e)
                    gevent.sleep(1.0)
                    continue
                except (OSError, StorageError) as e:
                    self._fatal(e)
                    return
            gevent.sleep(JOINED_POLL_SECONDS)

    def _key_refused(self, public_key: str) -> None:
        """The Raft port refused a key no list names: perhaps a member newer than our configuration. Ask for a
        newer list, at most once every KEYS_REFRESH_SECONDS (the transport's greenlet: never blocks)."""
        self._ask_keys_soon()

    def _ask_keys_soon(self) -> None:
        if self._keys_asking or self._stopping or not self._keys_refresh.due(time.monotonic()):
            return
        self._keys_asking = True
        gevent.spawn(self._ask_keys)

    def _ask_keys(self) -> None:
        """One round of GET /cluster/keys: the members of our configuration, then those of the vouched list, one at
        a time, until one vouches for a configuration newer than ours (or none is left)."""
        found = False
        try:
            asked = set()
            vouched = (self.node_key or {}).get("vouched", {})
            mine = [(m.node_id, m.http_address) for m in self.node.membership.members]
            theirs = sorted(vouched.get("http_addresses", {}).items())
            for node_id, address in [*sorted(mine), *theirs]:
                if node_id == self.node_id or not address or address in asked or self._stopping:
                    continue
                asked.add(address)
                answer = self._keys_of(node_id, address)
                if answer is not None and self._vouch(*answer):
                    log.info("%s vouched for the keys of its configuration at index %d (ours is at %d): admitted "
                             "until our log reaches it", node_id, answer[0], self.configuration_index())
                    found = True
                    return
        except Exception:
            log.exception("asking for the members' keys failed")
        finally:
            self._keys_refresh.round_done(found)
            self._keys_asking = False

    def _keys_of(self, node_id: str, address: str) -> tuple[int, dict[str, str], dict[str, str]] | None:
        """`node_id`'s signed answer to GET /cluster/keys, verified and parsed; None (logged at debug) when there
        is none within KEYS_REQUEST_TIMEOUT_SECONDS or it does not verify."""
        assert self.config.secret is not None
        headers = keys_request_headers(self.config.secret, node_id)
        request = urllib.request.Request(f"http://{address}{KEYS_PATH}", method="GET", headers=headers)
        try:
            # The socket's timeout bounds each step; gevent.Timeout the whole (an answer sent a byte at a time).
            with gevent.Timeout(2 * KEYS_REQUEST_TIMEOUT_SECONDS, OSError("no whole answer in time")):
                with _no_redirects.open(request, timeout=KEYS_REQUEST_TIMEOUT_SECONDS) as resp:
                    body, answer_headers = resp.read(MAX_KEYS_ANSWER_BYTES + 1), resp.headers
        except (OSError, urllib.error.URLError, ValueError, http.client.HTTPException) as e:
            log.debug("no keys from %s at %s: %s", node_id, address, e)
            return None
        try:
            if len(body) > MAX_KEYS_ANSWER_BYTES:
                raise ValueError(f"over {MAX_KEYS_ANSWER_BYTES} bytes")
            return read_keys_answer(self.config.secret, headers, body, answer_headers)
        except ValueError as e:
            log.warning("the keys %s at %s answered are ignored: %s", node_id, address, e)
            return None

    def _timed_fdatasync(self, fd: int, nbytes: int) -> None:
        t0 = time.perf_counter()
        if TEST_FSYNC_DELAY_FILE:
            _test_fsync_delay(TEST_FSYNC_DELAY_FILE)
        # Inline, holding the hub for the fsync: gevent's thread pool would free the hub meanwhile, but the
        # hand-off cost about as much as it won on the leader, and more on the followers, which have nothing
        # else to do (docs/BENCHMARKS.md).
        os.fdatasync(fd)
        self.metrics.fsync_seconds.observe(time.perf_counter() - t0)

    def _deliver(self, messages: list[Message], reply_wanted: bool) -> list[Message] | None:
        # The transport is made before the runtime it delivers to.
        if self.fenced and messages:
            src = messages[0].src  # a frame holds one peer's messages
            if src in self.fenced and src not in self.node.membership.node_ids:
                return self._fenced_answer(src) if reply_wanted else None
        return self.runtime.deliver(messages, reply_wanted)

    def _fenced_answer(self, src: str) -> list[Message]:
        """A member removed by -force-new-cluster spoke (nodestart.force_new_cluster: fenced): nothing of it
        reaches the node; it is told it was removed (a notice the core would send, at most the configuration's
        index of a second ago: O(entries) to find). Logged at most once a minute."""
        now = time.monotonic()
        if now - self._fence_checked_at >= 1.0:
            self._fence_checked_at = now
            self._fence_index = self.configuration_index()
        if now - self._fence_logged_at >= 60.0:
            self._fence_logged_at = now
            log.warning("dropped messages from %s, a member removed by -force-new-cluster: wipe its data dir",
                        src)
        node = self.node
        return [Removed(self.node_id, src, node.current_term, self._fence_index, node.leader_id or "")]

    def _fatal(self, error: Exception) -> None:
        log.critical("stopping (%s); exiting without acknowledging anything more", error)
        os._exit(3)

    # ---- lifecycle ----

    def start(self) -> None:
        """Start Raft, then serve HTTP. Raises OSError when the HTTP port cannot be bound."""
        config = self.config
        self.transport.start()
        self.runtime.start()
        api = Api(self.runtime, self.store, self.metrics, write_timeout_seconds=config.write_timeout_seconds,
                  read_timeout_seconds=config.read_timeout_seconds, forward=config.forward,
                  guard=None if config.secret is None else AdminGuard(config.secret), max_members=config.max_members,
                  committed_configuration=self.committed_configuration, feature_level=self.feature_level,
                  watch_hub=self.watch_hub, watch_guard_alive=self.watch_guard.alive,
                  # Watches hold connections: at most half the pool (edge.EdgeServer.handle relies on it,
                  # and never ends one to make room); 0 with one connection.
                  max_watches=min(MAX_WATCHES, config.max_connections // 2),
                  lease_keeper=self.leases.current,
                  # etcd's minimum TTL: 1.5 election timeouts, so an election does not eat a lease's TTL
                  min_ttl_seconds=max(1, math.ceil(1.5 * config.election_ms / 1000.0)),
                  backup_folder=self.storage.data_dir,
                  backup_timeout_seconds=self.runtime.snapshot_child_timeout_seconds,
                  backup_min_rate=config.backup_min_rate,
                  fenced=lambda: self.fenced, data_size=self.storage.disk_bytes)
        self.level_raiser = FeatureLevelRaiser(self.runtime, self.store, self.feature_level, api.membership_lock,
                                               config.write_timeout_seconds, connect=api.connect)
        api.upgrade_reason = self.level_raiser.reason
        # A request may take receiving, then its route's own bounds (routes_shared: at most twice its timeout), then
        # -idle-timeout more for a client slow to take its answer.
        # A long poll's wait and a watch stream are bounded on their own (edge.waiting_on_its_own, edge.Stream).
        longest_route_seconds = 2 * max(config.write_timeout_seconds, config.read_timeout_seconds) + 1
        allowed_hosts = AllowedHosts(config.allowed_hosts, (config.host, config.advertised_host),
                                     lambda: self.node.membership, node_address=self.http_address)
        self.http = EdgeServer(
            listen(self.bind_host, config.http_port), make_app(api), max_connections=config.max_connections,
            idle_timeout_seconds=config.idle_timeout_seconds, receive_timeout_seconds=config.receive_timeout_seconds,
            busy_timeout_seconds=config.receive_timeout_seconds + longest_route_seconds + config.idle_timeout_seconds,
            max_header_bytes=config.max_header_bytes, max_body_bytes=config.max_body_bytes,
            on_eviction=self.metrics.http_evictions.inc, access_log=config.access_log,
            host_refusal=allowed_hosts.refusal, max_unsent_bytes=config.max_unsent_bytes)
        http = self.http
        self.metrics.unsent = lambda: (http.unsent_bytes, len(http.holding))
        self.watch_guard.start()  # before HTTP: /readyz asks whether it runs
        self.http.start()
        gevent.spawn(self.metrics.watch_hub_lag)
        gevent.spawn(self.level_raiser.run)
        gevent.spawn(self.leases.run)
        if config.forward:
            self.leader_connections = pool = api.leader_connections
            self.metrics.forward_pool = lambda: (pool.opened, pool.resent)
            gevent.spawn(self._drop_old_leader_connections)
        if self.node_key is not None:
            self._vouched_watch = gevent.spawn(self._watch_vouched)
        if self.node_key is not None and self.node.membership.members:
            self._ask_keys_soon()  # our configuration may be older than the cluster's (a member that was down)
        log.info("node %s serving http://%s (raft tcp://%s), data in %s", self.node_id, self.http_address,
                 self.raft_address, config.data_dir)
        log.info("HTTP serves %s", allowed_hosts.served_names())
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < MIN_HARD_DESCRIPTORS:
            # Review 2 F3: with a small hard limit strangers' connections use up the descriptors at once, and zmq
            # then fails its accepts in a loop; the HTTP cap shrinks to a handful too.
            log.warning("the hard limit on open files (ulimit -Hn) is %d, under %d: connections to either port can "
                        "use up this node's descriptors; raise it (e.g. LimitNOFILE= in systemd)", hard,
                        MIN_HARD_DESCRIPTORS)
        if config.secret is None and not _is_loopback(self.bind_host):
            log.warning("listening on %s beyond loopback without a cluster secret: anyone who can reach the raft port "
                        "can speak for a member, and anyone who reaches the http port can join; give every node "
                        "-secret-file (or %s)", self.bind_host, SECRET_ENV)

    def _drop_old_leader_connections(self) -> None:
        """-forward: every FORWARD_POOL_CHECK_SECONDS, close the pool's connections to a leader that is no longer
        the one (review fwd, F2): this node leads now, or another node does, or none is known. Without this a
        follower that became leader kept up to 32 connections to the old one, half-closed once it timed them out."""
        pool = self.leader_connections
        while not self._stopping and pool is not None:
            gevent.sleep(FORWARD_POOL_CHECK_SECONDS)
            node = self.runtime.node
            pool.keep_only(None if node.role is Role.LEADER else leader_http(node.membership, node.leader_id))

    def stop(self) -> None:
        """Stop serving and close the data dir. A leader first hands leadership to its most up-to-date voter
        (thesis §3.10), so the cluster does not wait an election timeout for a new one."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down")
        if self._vouched_watch is not None:
            self._vouched_watch.kill()  # before the data dir closes: it may write node.key
        if self._joined_watch is not None:
            self._joined_watch.kill()  # likewise: it may write node.json
        if self.level_raiser is not None:
            self.level_raiser.stop()
        self.leases.stop()
        target = best_successor(self.runtime.status().node, self.node.config.election_ticks)
        if target is not None:
            try:
                self.runtime.transfer_leadership(target, timeout_seconds=HANDOVER_TIMEOUT_SECONDS)
                log.info("handed leadership to %s", target)
            except Exception as e:
                log.warning("leadership transfer before shutdown failed: %s", e)
        if self.http is not None:
            self.http.stop(timeout=1)
        if self.leader_connections is not None:
            self.leader_connections.close()  # after HTTP: no request forwards any more
        # After HTTP: while it serves (the hand-over, up to HANDOVER_TIMEOUT_SECONDS), /readyz must not answer
        # `watch guard not running`, a bug's reason (review of health, Q5).
        self.watch_guard.stop()
        self.runtime.stop()
        self.transport.stop()
        self.storage.close()
        log.info("stopped")

    # ---- joining ----

    def join(self, target: str) -> None:
        """Ask `target` (host:httpport) to add this node; follow redirects to the leader; bounded by
        -join-timeout. Raises JoinFailed."""
        fields = {"node_id": self.node_id, "raft_address": self.raft_address, "http_address": self.http_address,
                  "feature_level": self.feature_level}
        if self.node_key is not None:
            fields["public_key"] = self.public_key
        body = json.dumps(fields).encode()
        deadline = time.monotonic() + self.config.join_timeout_seconds
        url = f"http://{target}/join"
        last_error = "no answer"
        while time.monotonic() < deadline:
            try:
                request = self._join_request(url, body)
                with _no_redirects.open(request, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) as resp:
                    answer, answer_headers = resp.read(), resp.headers
                if self.node_key is not None:
                    self._admit_from_answer(request.get_header(SIGNATURE_HEADER.capitalize()) or "", answer,
                                            answer_headers)
                # A leader accepted the join. node.json's "joined" (a start without a log is refused from then
                # on) waits until a leader's term is saved in the log: a node killed before the leader's first
                # append lost nothing and must start again (final review, F1).
                self._joined_watch = gevent.spawn(self._mark_joined_once_reached)
                self.storage.remove_join_marker()  # (issue 11)
                log.info("joined the cluster through %s", url)
                return
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace").strip()
                if e.code == 307 and e.headers.get("Location"):
                    url = e.headers["Location"]
                    continue
                if e.code < 500:
                    raise JoinFailed(f"join refused by {url}: {e.code} {text}") from None
                last_error = f"{e.code} {text}"
            except (OSError, urllib.error.URLError) as e:
                last_error = str(getattr(e, "reason", e))
            gevent.sleep(0.2)
        raise JoinFailed(f"could not join the cluster at {target} within {self.config.join_timeout_seconds:g}s: "
                         f"{last_error}")

    def _admit_from_answer(self, request_signature: str, answer: bytes, headers) -> None:
        """The leader's answer to our signed join: check its signature (a stranger on the HTTP path must not name
        keys we admit), keep the members' keys in node.key (before JOINING goes: a restart before any leader
        reaches us still admits them), and admit them on the Raft port."""
        assert self.config.secret is not None and self.node_key is not None  # only with a secret
        if not verify_answer(self.config.secret, request_signature, answer, headers):
            raise JoinFailed("the answer to the join is not signed with this cluster's secret (a leader of an older "
                             "raftdzmq, or not the cluster's)")
        try:
            parsed = json.loads(answer)
            members, leader = parsed["members"], parsed.get("leader")
            admit = {k: v for k, v in members.items() if k != self.node_id}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise JoinFailed("the answer to the join lists no members' keys") from None
        keyless = sorted(k for k, v in admit.items() if not valid_public_key(v))
        if keyless or not admit or (leader is not None and leader not in admit):
            # Review 3 F3: a leader of a cluster made before node keys answered with its own key missing; the
            # node admitted nobody and waited for ever. No key of a member: nobody could reach this node as it.
            raise JoinFailed(f"the leader's answer lacks the node keys of {', '.join(keyless) or leader or 'the leader'}"
                             ": a cluster with a secret made by a raftdzmq before node keys cannot take new nodes; "
                             "recreate it with this version")
        try:
            index, members, http_addresses = parse_vouched(answer)
        except ValueError as e:
            raise JoinFailed(f"the answer to the join is not a list of members' keys: {e}") from None
        # The index of the configuration that added us: its keys count until our log holds it, however old the
        # configurations the leader's first appends bring (review: a log over one batch before the leader's own
        # join made the node drop the list at index 1 and refuse its leader for good). A retried join whose
        # configuration reached us already is not taken (transport.vouch).
        self._vouch(index, members, http_addresses)

    def _join_request(self, url: str, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.config.secret is not None:
            split = urllib.parse.urlsplit(url)
            target = split.path + (f"?{split.query}" if split.query else "")
            headers.update(admin_headers(self.config.secret, "POST", target, body))  # a fresh timestamp each try
        return urllib.request.Request(url, data=body, method="POST", headers=headers)


def best_successor(node: NodeStatus, responsive_within_ticks: int) -> str | None:
    """The voter other than this leader that a hand-over picks (progress.best_successor: the highest match, not
    one that said it restores a snapshot; of those that tie, one heard from within `responsive_within_ticks`: an
    election timeout, past which the transport holds what it sends a peer for its late reply), when this node
    leads others; else None."""
    if node.role is not Role.LEADER:
        return None
    responsive = [n for n, pr in node.progress.items() if pr.heard_within(responsive_within_ticks)]
    return progress_best_successor(node.progress, [v for v in node.membership.voters if v != node.node_id],
                                   responsive)


def _test_fsync_delay(path: str) -> None:
    try:
        with open(path) as f:
            seconds = float(f.read())
    except (OSError, ValueError):
        return
    monkey.get_original("time", "sleep")(seconds)  # not gevent's sleep: a slow fsync holds the hub too


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_no_redirects = urllib.request.build_opener(_NoRedirect)
