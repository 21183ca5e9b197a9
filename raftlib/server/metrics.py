"""The Prometheus metrics of GET /metrics: what the server counts itself (writes and reads by outcome, write, fsync
and read-index latencies, how late the event loop runs timers), and gauges read from the runtime's status.

Rules:
- Every update comes from the one thread that runs the event loop, so counters and histograms are plain Python
  (a dict, a list of bucket counts): prometheus_client's own metrics take a lock on every update, a cost paid on
  every write.
- The gauges read only `Runtime.status()` (a frozen RuntimeStatus), once per scrape, never the core's fields.
- The registry is this node's own, not prometheus_client's global one.
"""

from __future__ import annotations

import bisect
import collections
import math
import time
from collections.abc import Callable, Iterator

import gevent
import prometheus_client as prom
import prometheus_client.core as prom_core
import prometheus_client.utils as prom_utils

from raftlib.messages import Role
from raftlib.runtime import RuntimeStatus


class Counter:
    """A counter by one label, kept in a dict."""

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.values: collections.Counter[str] = collections.Counter()

    def inc(self, label_value: str, count: int = 1) -> None:
        self.values[label_value] += count

    def collect(self) -> prom_core.CounterMetricFamily:
        family = prom_core.CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, count in sorted(self.values.items()):
            family.add_metric([value], count)
        return family


class Histogram:
    """A histogram kept in a list of bucket counts."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """`count` observations of `seconds`."""
        self.counts[bisect.bisect_left(self.buckets, seconds)] += count
        self.sum += seconds * count

    def collect(self) -> prom_core.HistogramMetricFamily:
        cumulative, rows = 0, []
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            rows.append((prom_utils.floatToGoString(bound), cumulative))
        family = prom_core.HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], rows, self.sum)
        return family


class StreamWrites:
    """The frames a turn of the watch wake writes (watchstream.SocketWriter.deliver), tallied as they go and added
    to the stream's events counter and the delivery histogram once the turn ends (`flush`: WatchHub.after_wake).
    The two updates cost a follower ~1 us a frame at 1,000 frames a sweep; a tally is an add and a compare: the
    frames of a turn share their write time (the wake's clock read) and mostly their apply time, so a run of equal
    figures is one update of the histogram."""

    __slots__ = ("events", "frames", "seconds", "_counter", "_histogram")

    def __init__(self, counter: Counter, histogram: Histogram) -> None:
        self._counter, self._histogram = counter, histogram
        self.events = 0  # events written since the last flush
        self.frames = 0  # frames of the current run, each `seconds` from apply to write
        self.seconds = 0.0

    def add(self, events: int, seconds: float) -> None:
        """A frame of `events` events written `seconds` after the oldest one's apply."""
        self.events += events
        if seconds == self.seconds:
            self.frames += 1
            return
        if self.frames:
            self._histogram.observe(self.seconds, self.frames)
        self.seconds, self.frames = seconds, 1

    def flush(self) -> None:
        if self.frames:
            self._histogram.observe(self.seconds, self.frames)
            self.frames = 0
        if self.events:
            self._counter.inc("stream", self.events)
            self.events = 0


# The gauges: (name, help, the value in a RuntimeStatus).
GAUGES: tuple[tuple[str, str, Callable[[RuntimeStatus], float]], ...] = (
    ("raftdzmq_term", "Current term", lambda s: s.node.term),
    ("raftdzmq_commit_index", "Commit index", lambda s: s.node.commit_index),
    ("raftdzmq_applied_index", "Last applied index", lambda s: s.node.last_applied),
    ("raftdzmq_last_index", "Last log index", lambda s: s.node.last_index),
    ("raftdzmq_snapshot_index", "Index of the newest snapshot", lambda s: s.node.snapshot_index),
    ("raftdzmq_is_leader", "1 on the leader", lambda s: int(s.node.role is Role.LEADER)),
    ("raftdzmq_proposals", "Proposals taken by this node as leader", lambda s: s.stats["proposals"]),
    ("raftdzmq_uncommitted_bytes", "Bytes of entries this leader appended in its term and has not committed yet "
     "(-max-uncommitted-bytes bounds them); 0 unless it leads", lambda s: s.node.uncommitted_bytes),
    ("raftdzmq_snapshot_catch_up_entries", "Entries kept in memory behind this node's snapshot's cut "
     "(-snapshot-catch-up-entries), sent as appends to a follower a little behind it instead of the snapshot",
     lambda s: s.node.catch_up_entries),
    ("raftdzmq_snapshot_catch_up_bytes", "Bytes of the entries kept behind the snapshot's cut (each entry's data "
     "and 24; at most 8 MiB)", lambda s: s.node.catch_up_bytes),
    ("raftdzmq_applied_entries", "Entries applied", lambda s: s.stats["applied"]),
    ("raftdzmq_elections_won", "Elections this node won", lambda s: s.stats["elections_won"]),
    ("raftdzmq_batches_saved", "Batches made durable (one fsync each)", lambda s: s.stats["saves"]),
    ("raftdzmq_snapshots", "Snapshots taken", lambda s: s.stats["snapshots"]),
    ("raftdzmq_loop_lag_seconds_max", "The hub-lag probe (RAFTDZMQ_LOOP_LAG_PROBE_SECONDS): the latest a short "
     "sleep woke since start", lambda s: s.stats["loop_lag_max_microseconds"] / 1e6),
    ("raftdzmq_loop_lags_over_10ms", "The hub-lag probe: wake-ups more than 10 ms late",
     lambda s: s.stats["loop_lags_over_10ms"]),
    ("raftdzmq_restore_step_seconds_max", "The longest step of restoring a leader's snapshot into the state "
     "machine, in CPU seconds (the event loop is held at least that long)", lambda s: s.stats["restore_step_max_microseconds"] / 1e6),
    ("raftdzmq_snapshot_commit_seconds_max", "The longest commit of a snapshot of this node's own (the event "
     "loop held that long: a rename, a pre-built log segment's last records, fsyncs), in seconds",
     lambda s: s.stats["snapshot_commit_max_microseconds"] / 1e6),
    ("raftdzmq_snapshot_stepped_cpu_seconds", "The last stepped snapshot's CPU in the serving process's loop "
     "(its steps and appends: what a forked child spent elsewhere), in seconds",
     lambda s: s.stats["snapshot_stepped_cpu_microseconds"] / 1e6),
    ("raftdzmq_snapshot_stepped_seconds", "The last stepped snapshot's wall time, from its begin to its file's "
     "fsync, in seconds", lambda s: s.stats["snapshot_stepped_wall_microseconds"] / 1e6),
    ("raftdzmq_out_of_descriptors", "Saves and snapshots refused for want of a file descriptor (each try; "
     "retried)", lambda s: s.stats["out_of_descriptors"]),
)

# Counters kept by the runtime (its status' stats): (name without `_total`, help, the value in a RuntimeStatus).
STATUS_COUNTERS: tuple[tuple[str, str, Callable[[RuntimeStatus], float]], ...] = (
    ("raftdzmq_snapshot_reads_failed", "Snapshot transfers abandoned because the snapshot's file could not be "
     "read (an I/O error, a file cut short; each retry counts; logged at most every 10 s per peer)",
     lambda s: s.stats["snapshot_reads_failed"]),
    ("raftdzmq_snapshots_installed", "Leaders' snapshots installed here (saved, then restored into the state "
     "machine)", lambda s: s.stats["snapshots_installed"]),
    ("raftdzmq_snapshot_catch_up_appends", "Appends this node sent as leader from the entries it keeps behind its "
     "snapshot's cut (-snapshot-catch-up-entries) to a follower that would otherwise have been sent the snapshot",
     lambda s: s.stats["snapshot_catch_up_appends"]),
    ("raftdzmq_proposals_refused_uncommitted", "Proposals this node refused as leader because it held "
     "-max-uncommitted-bytes not yet committed: clients' writes (writes{outcome=\"refused_uncommitted\"}) and its "
     "own entries (lease expiries, the feature-level raise, signed admin claims)",
     lambda s: s.stats["proposals_refused_uncommitted"]),
)


class Metrics:
    """This node's metrics, in a registry of its own (`registry`, for prometheus_client.generate_latest)."""

    def __init__(self) -> None:
        self.writes = Counter("raftdzmq_writes", "Writes answered, by outcome", "outcome")
        self.write_seconds = Histogram("raftdzmq_write_seconds", "Time from proposal to commit and apply",
                                       (.0005, .001, .002, .005, .01, .02, .05, .1, .5, 2))
        self.fsync_seconds = Histogram("raftdzmq_fsync_seconds", "Log fdatasync time per batch",
                                       (.00005, .0001, .0002, .0005, .001, .002, .005, .01, .05))
        self.reads = Counter("raftdzmq_reads", "Reads answered, by consistency", "consistency")
        self.http_evictions = Counter("raftdzmq_http_evictions", "HTTP connections the server closed, by reason "
                                      "(full_idle, full_receiving, full_draining: the pool was full; idle_timeout, "
                                      "busy_timeout; unsent_budget: a stalled slow reader, past -max-unsent-bytes; "
                                      "backup_too_slow: a backup's reader under -backup-min-rate)",
                                      "reason")
        self.read_index_seconds = Histogram("raftdzmq_read_index_seconds", "Time to confirm a read index",
                                            (.0005, .001, .002, .005, .01, .05, .1, .5))
        self.hub_lag_seconds = Histogram("raftdzmq_hub_lag_seconds", "How late a 10 ms gevent timer fires: the "
                                         "delay every timer (ticks, heartbeats, elections) sees",
                                         (.001, .002, .005, .01, .02, .05, .1, .25, .5, 1))
        self.watch_events = Counter("raftdzmq_watch_events_delivered", "Watch events handed to watchers, by mode "
                                    "(stream: server-sent events, poll)", "mode")
        self.watches_behind = Counter("raftdzmq_watches_behind", "Watches ended or refused (410) because the event "
                                      "history moved past them, by mode", "mode")
        self.watches_refused = Counter("raftdzmq_watches_refused", "Watches ended or refused because this node was "
                                       "removed or has heard from no leader for too long (watchguard), by mode",
                                       "mode")
        self.watch_delivery_seconds = Histogram(
            "raftdzmq_watch_delivery_seconds", "Time from applying a change to writing the stream frame that "
            "carries it to a watcher's socket, per frame written (its oldest event's): the server's share of a "
            "watch's latency; its count is the frames written", (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.stream_writes = StreamWrites(self.watch_events, self.watch_delivery_seconds)
        self.watches_open = 0  # a gauge: the watches (streams and long polls) open now
        # Leases (issue 14 part 2): keepalives answered by outcome (kept, not_found), and leases whose expiry this
        # node proposed as leader, by outcome (committed; failed: not applied, retried or left to the next leader;
        # unknown: a timeout, proposed again).
        self.lease_keepalives = Counter("raftdzmq_lease_keepalives", "Lease keepalives answered, by outcome",
                                        "outcome")
        self.lease_expirations = Counter("raftdzmq_lease_expirations", "Leases this node expired as leader, by "
                                         "outcome of the LEASE_EXPIRE entry", "outcome")
        # -forward (review fwd, F4): requests passed on to the leader, by result, and the pool's counts (connections
        # opened, requests sent again on a new connection after a reused one failed before they could arrive).
        self.forwards = Counter("raftdzmq_forwards", "Requests this follower passed on to the leader (-forward), by "
                                "result (answered; not_sent: not applied; no_answer: outcome unknown)", "result")
        self.forward_pool: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.lease_count: Callable[[], int | None] = lambda: 0  # None: no sample (the state is not there yet)
        # The HTTP edge's budget of unsent answers (edge.EdgeServer.hold): (bytes held now, connections holding them)
        self.unsent: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._status: Callable[[], RuntimeStatus] | None = None
        self.registry = prom.CollectorRegistry()
        self.registry.register(self)

    def bind(self, status: Callable[[], RuntimeStatus]) -> None:
        """Read the gauges from `status` (the runtime's `status`) at every scrape."""
        self._status = status

    def collect(self) -> Iterator[prom_core.Metric]:
        for m in (self.writes, self.write_seconds, self.fsync_seconds, self.reads, self.read_index_seconds,
                  self.hub_lag_seconds, self.http_evictions, self.watch_events, self.watch_delivery_seconds,
                  self.watches_behind, self.watches_refused, self.lease_keepalives, self.lease_expirations,
                  self.forwards):
            yield m.collect()
        opened, resent = self.forward_pool()
        yield prom_core.CounterMetricFamily("raftdzmq_forward_connections_opened", "Connections to the leader this "
                                            "follower opened to pass requests on (-forward)", value=opened)
        yield prom_core.CounterMetricFamily("raftdzmq_forward_resent", "Forwarded requests sent again on a new "
                                            "connection, a reused one having failed before they could reach the "
                                            "leader (-forward)", value=resent)
        yield prom_core.GaugeMetricFamily("raftdzmq_watches_open", "Watches open now (streams and long polls)",
                                          value=self.watches_open)
        unsent_bytes, holders = self.unsent()
        yield prom_core.GaugeMetricFamily("raftdzmq_http_unsent_bytes", "Bytes of answers held now for HTTP clients "
                                          "slow to take them, each shared one once (the fill of -max-unsent-bytes)",
                                          value=unsent_bytes)
        yield prom_core.GaugeMetricFamily("raftdzmq_http_unsent_holders", "HTTP connections holding such answers now",
                                          value=holders)
        leases = self.lease_count()
        yield prom_core.GaugeMetricFamily("raftdzmq_leases", "Leases in the replicated state", value=leases)
        if self._status is not None:
            status = self._status()
            for name, doc, value in GAUGES:
                yield prom_core.GaugeMetricFamily(name, doc, value=value(status))
            for name, doc, value in STATUS_COUNTERS:
                yield prom_core.CounterMetricFamily(name, doc, value=value(status))

    def watch_hub_lag(self, period_seconds: float = 0.01) -> None:
        """Runs in a greenlet of its own: sleep `period_seconds` and note how late the wake-up came."""
        while True:
            t0 = time.monotonic()
            gevent.sleep(period_seconds)
            self.hub_lag_seconds.observe(max(0.0, time.monotonic() - t0 - period_seconds))
