"""The dashboard's routes: GET /events (this node's event ring), GET /stats (this node's numbers for a page),
GET /cluster/status (every member's, gathered by this node), and GET /ui with its assets (the page itself, in
raftlib/server/ui/, shipped as package data).

Rules:
- Cheap: nothing here runs unless a page (or someone) asks. No greenlet, no timer, no extra metric; the numbers
  are those the node keeps anyway (raftlib.server.metrics, the runtime's status and its event ring).
- GET /cluster/status answers for the whole cluster from one origin: this node asks each other member of its
  configuration for GET /stats, each in a greenlet of its own (at most MAX_ASKS_IN_FLIGHT open at once), within
  MEMBER_TIMEOUT_SECONDS each (connect, send and read together) and GATHER_SECONDS in all. One gather runs at a
  time: the callers that come while it runs wait for it, and its result serves every caller for CACHE_SECONDS
  from its end (100 pages, or 100 scripts, cost the members one ask each per CACHE_SECONDS, not 100). This node's own numbers
  come from memory, never over HTTP.
- A member's answer is another process's word, and a learner's address is whatever its unsigned /join said: the
  members listed, the leader and the term are this node's own view (its configuration, its leader); the match
  indices of a node that does not lead come from the answer of the leader it knows, checked by node_id. An answer
  counts only when it is a JSON object of at most MAX_MEMBER_ANSWER_BYTES naming the member's own node_id; each
  field is copied only when it has the type this node's GET /stats gives it (else null, and named in the row's
  "malformed"); events only when flat and well-typed, an event of more than MAX_EVENT_BYTES as JSON shortened to
  its seq, time and kind with "truncated": true (so a member's held ring is bounded in bytes, not only in count),
  and an answer holds the newest MAX_ANSWER_EVENTS events of all members. A member without such an answer is `"up": false` with the
  error "unreachable" and nothing more: the reason (refused, timed out, answered 404) would make the route a port
  scanner of this node's network. The reason goes to this node's log at debug level, never a traceback.
- The event ring's sequence numbers are per process (raftlib.events): GET /cluster/status?events_since=ID:SEQ,...
  passes the newest sequence number the page has of each member and returns only newer events, each with its
  node's id, oldest first by wall-clock time (the nodes' clocks are not synchronised: the order across nodes is
  as good as their clocks). The gather keeps a copy of each member's ring, asking it only for what is newer, so
  that one gather serves callers that each hold different events.
- The page's actions (POST /ui/actions/transfer, DELETE /ui/actions/members/ID) are the admin routes' (POST
  /cluster/transfer, DELETE /cluster/ID) run on the leader, and need the ACTION_HEADER header (the page sends it;
  a page of another site cannot without a CORS preflight, which nothing here answers): a cross-site form or
  no-cors fetch is refused 403. With a cluster secret they must be signed, which a browser cannot do without the
  secret: GET /cluster/status says `"admin_guarded": true` and the page then shows the actions as unavailable,
  read-only. The page and its assets are sent with X-Frame-Options: DENY and CSP frame-ancestors 'none' (no
  framing by another site: clickjacking).
- GET /ui serves index.html; GET /ui/NAME serves only the files named in ASSETS (no path from the request reaches
  the file system). The files are read once, on first request, and kept in memory.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Callable

import bottle
import gevent
import gevent.event
import gevent.lock

from raftlib import events
from raftlib.messages import Role

from .routes_cluster import remove_member, transfer
from .routes_shared import (FORWARDED_HEADER, NOT_APPLIED, OUTCOME_HEADER, Api, counts_nothing_yet, forward_to,
                            json_answer, leader_http, log, members, own_header, text)

MEMBER_TIMEOUT_SECONDS = 0.5  # each member gets this long to answer GET /stats (connect, send, read)
GATHER_SECONDS = 0.6  # a whole gather: the members not answered by then are unreachable
CACHE_SECONDS = 0.5  # a gather's result serves every GET /cluster/status for this long
MAX_ASKS_IN_FLIGHT = 16  # GET /stats asks open at once, whatever the number of members
MAX_MEMBER_ANSWER_BYTES = 64 * 1024  # a member's answer (its /stats with its newest events) is a few KB
MAX_COUNTERS = 32  # a member's writes and reads counters
MAX_BUCKETS = 64  # a member's histogram's buckets
MAX_EVENT_LIST = 64  # the ids an event lists (a configuration's voters or learners)
# A member's event as JSON: a larger one is kept as its seq, time and kind with "truncated": true (this node's own
# are ~100 bytes). So a member's held ring is at most events.DEFAULT_CAPACITY * MAX_EVENT_BYTES (256 KB).
MAX_EVENT_BYTES = 1024
MAX_EVENT_KIND = 32  # characters of an event's kind
MAX_ANSWER_EVENTS = 256  # the newest events of all members in one GET /cluster/status answer
# The header the page sends with its actions. A page elsewhere cannot send it without a CORS preflight (which this
# node does not answer): a cross-site form or a no-cors fetch arrives without it and is refused.
ACTION_HEADER = "X-Raft-Dashboard"
# Sent with the page and its assets: no other site may frame them (clickjacking of the actions).
UI_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
              "Content-Security-Policy": "frame-ancestors 'none'"}
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")
# name -> content type. uPlot (https://github.com/leeoniya/uPlot, MIT): vendored from npm, see ui/uPlot.LICENSE.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
_asset_cache: dict[str, bytes] = {}
# The histograms a page charts, as GET /stats names them: (name, the Metrics attribute).
HISTOGRAMS = (("write_seconds", "write_seconds"), ("fsync_seconds", "fsync_seconds"),
              ("read_index_seconds", "read_index_seconds"), ("hub_lag_seconds", "hub_lag_seconds"))


def _since(raw: str) -> int:
    """A sequence number from a query (decimal digits); ValueError otherwise."""
    if not raw.isdigit() or len(raw) > 18:
        raise ValueError(raw)
    return int(raw)


def events_answer(api: Api, since: int) -> dict:
    ring = api.runtime.events
    return {"node_id": api.runtime.node.node_id, "first_seq": ring.first_seq, "last_seq": ring.last_seq,
            "events": ring.since(since)}


def get_events(api: Api) -> bottle.HTTPResponse:
    """GET /events?since=SEQ: this node's events after SEQ (default 0: every one held), oldest first."""
    raw = bottle.request.query.get("since", "0")
    try:
        since = _since(raw)
    except ValueError:
        return text(400, f"since must be a sequence number (decimal digits), not {raw!r}")
    return json_answer(events_answer(api, since))


def stats_of(api: Api, events_since: int | None) -> dict:
    """This node's numbers for a page: its status, its counters and histograms as kept (a page computes rates and
    quantiles from two answers), and its events after `events_since` when asked."""
    status = api.runtime.status()
    node = status.node
    metrics = api.metrics
    answer = {
        "node_id": node.node_id, "role": node.role.value, "term": node.term, "leader": node.leader_id,
        "leader_http": leader_http(node.membership, node.leader_id), "commit_index": node.commit_index,
        "applied_index": node.last_applied, "last_index": node.last_index, "snapshot_index": node.snapshot_index,
        "disk_full": status.disk_full, "running": status.running, "members": members(node),
        "removed": node.removed and {"by": node.removed[0], "index": node.removed[1]},
        "keys": None if counts_nothing_yet(api.runtime, node) else len(api.store), "time": time.time(),
        "elections_won": status.stats["elections_won"],
        "writes": dict(metrics.writes.values), "reads": dict(metrics.reads.values),
        "histograms": {name: {"bounds": list(getattr(metrics, attr).buckets), "counts": list(getattr(metrics, attr).counts)}
                       for name, attr in HISTOGRAMS},
    }
    if events_since is not None:
        answer["events"] = events_answer(api, events_since)
    return answer


def get_stats(api: Api) -> bottle.HTTPResponse:
    """GET /stats (?events_since=SEQ: with this node's events after SEQ)."""
    raw = bottle.request.query.get("events_since")
    try:
        since = None if raw is None else _since(raw)
    except ValueError:
        return text(400, f"events_since must be a sequence number (decimal digits), not {raw!r}")
    return json_answer(stats_of(api, since))


def parse_events_since(raw: str) -> dict[str, int]:
    """`ID:SEQ,ID:SEQ` -> {ID: SEQ}; ValueError naming the bad part."""
    wanted: dict[str, int] = {}
    for part in filter(None, raw.split(",")):
        node_id, sep, seq = part.rpartition(":")
        if not sep or not node_id:
            raise ValueError(f"{part!r} is not ID:SEQ")
        wanted[node_id] = _since(seq)
    return wanted


class Unanswered(Exception):
    """A member gave no usable answer to GET /stats (the reason stays in this node: the page is told only
    "unreachable", never an error of the connection, which would make /cluster/status a port scanner)."""


def ask_member(connect: Callable[..., http.client.HTTPConnection], address: str, path: str) -> dict:
    """GET `path` of the member at `address` as a JSON object of at most MAX_MEMBER_ANSWER_BYTES, within
    MEMBER_TIMEOUT_SECONDS in all; Unanswered when it does not answer so. Nothing else escapes: this runs in a
    greenlet of its own, and a greenlet dying of an exception prints its traceback."""
    try:
        host, _, port = address.rpartition(":")
        conn = connect(host, int(port), timeout=MEMBER_TIMEOUT_SECONDS)
        try:
            with gevent.Timeout(MEMBER_TIMEOUT_SECONDS, Unanswered("no answer in time")):
                conn.request("GET", path)
                resp = conn.getresponse()
                if resp.status != 200:
                    raise Unanswered(f"answered {resp.status}")
                body = resp.read(MAX_MEMBER_ANSWER_BYTES + 1)
            if len(body) > MAX_MEMBER_ANSWER_BYTES:
                raise Unanswered("answered more than MAX_MEMBER_ANSWER_BYTES")
            answer = json.loads(body)
        finally:
            conn.close()
    except Unanswered:
        raise
    except (OSError, ValueError, http.client.HTTPException, RecursionError) as e:
        raise Unanswered(str(e)) from None
    if not isinstance(answer, dict):
        raise Unanswered("not a JSON object")
    return answer


# ---- what a member's answer may hold --------------------------------------------------------------------------
# A member's answer is another process's word: each field is copied only when it has the type this node's own
# GET /stats gives it, else it is null and named in the row's "malformed".

def _count(v: object) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e300


def _counters(v: object) -> bool:
    return (isinstance(v, dict) and len(v) <= MAX_COUNTERS
            and all(isinstance(k, str) and len(k) <= 64 and _count(n) for k, n in v.items()))


def _histograms(v: object) -> bool:
    return (isinstance(v, dict) and set(v) <= {name for name, _ in HISTOGRAMS} and all(
        isinstance(h, dict) and set(h) == {"bounds", "counts"} and isinstance(h["bounds"], list)
        and isinstance(h["counts"], list) and len(h["bounds"]) <= MAX_BUCKETS and len(h["counts"]) <= MAX_BUCKETS + 1
        and all(_number(b) for b in h["bounds"]) and all(_count(c) for c in h["counts"]) for h in v.values()))


def _removed(v: object) -> bool:
    return v is None or v is False or (isinstance(v, dict) and set(v) == {"by", "index"}
                                       and (v["by"] is None or isinstance(v["by"], str)) and _count(v["index"]))


ROLES = frozenset(r.value for r in Role)
# A member's fields as its GET /stats names them, each with its check: null for a member that did not answer
# (and `keys` null from one that restores a snapshot into its empty state: stats_of).
MEMBER_FIELDS: dict[str, Callable[[object], bool]] = {
    "role": lambda v: isinstance(v, str) and v in ROLES, "term": _count,
    "leader": lambda v: v is None or isinstance(v, str),
    "commit_index": _count, "applied_index": _count, "last_index": _count, "snapshot_index": _count,
    "disk_full": lambda v: type(v) is bool, "keys": lambda v: v is None or _count(v), "time": _number,
    "writes": _counters, "reads": _counters, "histograms": _histograms, "removed": _removed,
}
EVENT_FIELD = re.compile(r"[a-z_]{1,32}")


def _event(v: object) -> dict | None:
    """An event of a member's ring as the page may show it (seq, time, kind and flat fields), else None."""
    if not (isinstance(v, dict) and _count(v.get("seq")) and _number(v.get("time")) and isinstance(v.get("kind"), str)
            and len(v["kind"]) <= MAX_EVENT_KIND and len(v) <= 16):
        return None
    for k, field_value in v.items():
        if not (isinstance(k, str) and EVENT_FIELD.fullmatch(k)):
            return None
        if isinstance(field_value, list):
            if len(field_value) > MAX_EVENT_LIST or not all(isinstance(x, str) for x in field_value):
                return None
        elif not (field_value is None or isinstance(field_value, (str, bool)) or _number(field_value)):
            return None
    if len(json.dumps(v)) > MAX_EVENT_BYTES:
        return {"seq": v["seq"], "time": v["time"], "kind": v["kind"], "truncated": True}
    return v


def match_indices(listed: object, known: set[str]) -> dict[str, int]:
    """The match indices of the members the leader's answer lists (`listed`), for the ids in `known` only; an
    entry of another shape (an id that is not a string, a match index that is not a count) is left out."""
    if not isinstance(listed, list):
        return {}
    return {m["id"]: m["match_index"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)
            and m["id"] in known and _count(m.get("match_index"))}


class Gathered:
    """One gather's result: each other member that answered as itself, its checked numbers and the names of the
    malformed fields it sent (by id); and the match indices of the leader's answer. A member missing here is
    unreachable."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.stats: dict[str, dict] = {}
        self.malformed: dict[str, list[str]] = {}
        self.match_index: dict[str, int] = {}  # from the leader's answer, when this node does not lead


class StatusGatherer:
    """GET /cluster/status's asks of the other members, one gather at a time (the module's rules): the callers
    that come while one runs wait for it, and those within CACHE_SECONDS after get its result. Each member's event
    ring is copied here as it grows (each ask asks only for the events newer than those held), so that one gather
    serves callers that each hold different events."""

    def __init__(self) -> None:
        self._last: Gathered | None = None
        self._running: gevent.event.AsyncResult | None = None
        self._asking = gevent.lock.BoundedSemaphore(MAX_ASKS_IN_FLIGHT)
        self.rings: dict[str, tuple[int, list[dict]]] = {}  # member -> (its last sequence number, its newest events)

    def gathered(self, api: Api) -> Gathered:
        last = self._last
        if last is not None and time.monotonic() - last.at < CACHE_SECONDS:
            return last
        running = self._running
        if running is not None:
            return running.get(timeout=GATHER_SECONDS + 1)
        running = self._running = gevent.event.AsyncResult()
        try:
            result = self._last = self._gather(api)
            running.set(result)
            return result
        except BaseException as e:
            running.set_exception(e)
            raise
        finally:
            self._running = None

    def _ask(self, api: Api, member: dict) -> dict | str:
        """The member's answer, or why there is none. Runs in a greenlet of its own, so it raises nothing: a
        greenlet dying of an exception prints its traceback, for every member down at every poll."""
        try:
            if not self._asking.acquire(timeout=GATHER_SECONDS):
                return "no free slot to ask in time"
            try:
                held = self.rings.get(member["id"], (0, []))[0]
                return ask_member(api.connect, member["http_address"], f"/stats?events_since={held}")
            finally:
                self._asking.release()
        except Unanswered as e:
            return str(e)

    def _gather(self, api: Api) -> Gathered:
        node = api.runtime.status().node
        me = node.node_id
        configuration = members(node)
        result = Gathered(0.0)  # stamped when it ends: a gather that waited out a member is fresh then
        self.rings = {k: v for k, v in self.rings.items() if any(m["id"] == k for m in configuration)}
        asked = {m["id"]: gevent.spawn(self._ask, api, m) for m in configuration if m["id"] != me and m["http_address"]}
        gevent.joinall(list(asked.values()), timeout=GATHER_SECONDS)
        for node_id, greenlet in asked.items():
            answer = greenlet.value if greenlet.successful() else "no answer in time"
            if not isinstance(answer, dict):
                greenlet.kill(block=False)
                log.debug("GET /cluster/status: member %s unreachable: %s", node_id, answer)
                continue
            if answer.get("node_id") != node_id:  # another node, or none of this cluster, at that address
                log.debug("GET /cluster/status: member %s's address answered as %r", node_id, answer.get("node_id"))
                continue
            fields = {k: answer.get(k) for k in MEMBER_FIELDS}
            result.malformed[node_id] = [k for k, v in fields.items() if not MEMBER_FIELDS[k](v)]
            result.stats[node_id] = {k: None if k in result.malformed[node_id] else v for k, v in fields.items()}
            self._keep_events(node_id, answer.get("events"))
            if node_id == node.leader_id:
                result.match_index = match_indices(answer.get("members"), {m["id"] for m in configuration})
        result.at = time.monotonic()
        return result

    def _keep_events(self, node_id: str, ring: object) -> None:
        if not (isinstance(ring, dict) and _count(ring.get("last_seq")) and isinstance(ring.get("events"), list)):
            return
        fresh = [e for e in map(_event, ring["events"]) if e is not None]
        last_seq, held = self.rings.get(node_id, (0, []))
        if ring["last_seq"] < last_seq:  # the member restarted: its sequence numbers began again
            held = []
        held = [*held, *(e for e in fresh if not held or e["seq"] > held[-1]["seq"])][-events.DEFAULT_CAPACITY:]
        self.rings[node_id] = (ring["last_seq"], held)


def _gatherer(api: Api) -> StatusGatherer:
    gatherer = api.dashboard_state.get("gatherer")
    if not isinstance(gatherer, StatusGatherer):
        gatherer = api.dashboard_state["gatherer"] = StatusGatherer()
    return gatherer


def _events_after(ring: tuple[int, list[dict]], since: int) -> list[dict]:
    """A held ring's events after `since`, as EventRing.since answers (all when `since` is past its end: the
    member restarted since the page last asked)."""
    last_seq, held = ring
    return held if since > last_seq else [e for e in held if e["seq"] > since]


def cluster_status(api: Api) -> bottle.HTTPResponse:
    """GET /cluster/status (the module's rules)."""
    raw = bottle.request.query.get("events_since", "")
    try:
        events_since = parse_events_since(raw)
    except ValueError as e:
        return text(400, f"events_since must be ID:SEQ,ID:SEQ...: {e}")
    me = api.runtime.node.node_id
    gatherer = _gatherer(api)
    gathered = gatherer.gathered(api)
    own = stats_of(api, events_since.get(me, 0))
    leader_id = own["leader"]
    leading = leader_id == me
    rows = []
    for member in own["members"]:
        node_id = member["id"]
        row = {"id": node_id, "raft_address": member["raft_address"], "http_address": member["http_address"],
               "voter": member["role"] == "voter"}
        stats = {k: own[k] for k in MEMBER_FIELDS} if node_id == me else gathered.stats.get(node_id)
        row.update({"up": stats is not None, "error": None if stats is not None else "unreachable",
                    "malformed": [] if node_id == me else gathered.malformed.get(node_id, [])})
        row.update({k: None if stats is None else stats[k] for k in MEMBER_FIELDS})
        match_index = member["match_index"] if leading else gathered.match_index.get(node_id)
        leader_last = own["last_index"] if leading else (gathered.stats.get(leader_id or "") or {}).get("last_index")
        row["match_index"] = match_index
        row["lag"] = None if match_index is None or leader_last is None else max(0, leader_last - match_index)
        rows.append(row)
    rings = {node_id: ring for node_id, ring in gatherer.rings.items() if node_id != me}
    merged: list[dict] = [{**e, "node": me} for e in own["events"]["events"]]
    for node_id, ring in rings.items():
        merged.extend({**e, "node": node_id} for e in _events_after(ring, events_since.get(node_id, 0)))
    merged.sort(key=lambda e: (e["time"], e["node"], e["seq"]))
    del merged[:-MAX_ANSWER_EVENTS]
    last_seq = {me: own["events"]["last_seq"], **{node_id: ring[0] for node_id, ring in rings.items()}}
    return json_answer({"node_id": me, "time": time.time(), "leader": leader_id,
                        "term": own["term"] if leader_id is not None else None, "admin_guarded": api.guard is not None,
                        "members": rows, "events": merged, "events_last_seq": last_seq})


def asset(name: str) -> bytes:
    """The bytes of the file ASSETS names `name`, read once."""
    body = _asset_cache.get(name)
    if body is None:
        with open(os.path.join(ASSETS_DIR, name), "rb") as f:
            body = _asset_cache[name] = f.read()
    return body


def get_ui(api: Api, name: str = "index.html") -> bottle.HTTPResponse:
    """GET /ui and GET /ui/NAME: the page and its assets (404 for any other name)."""
    content_type = ASSETS.get(name)
    if content_type is None:  # the name is not echoed: the answer holds nothing the request chose
        return text(404, "no such file of the dashboard", **UI_HEADERS)
    # The page may change with the node's version: asked again each time (cheap: a few KB from memory).
    return bottle.HTTPResponse(asset(name), 200, {"Content-Type": content_type, **UI_HEADERS})


def _on_the_leader(api: Api, action: Callable[[], bottle.HTTPResponse]) -> bottle.HTTPResponse:
    """A page's action: run it here when this node leads, else pass it to the leader (one hop: a forwarded
    request that finds no leader here is answered 503). Refused (403) with a cluster secret: it would have to be
    signed, and the page has no secret. Refused (403) too without ACTION_HEADER (or the header of a request a
    follower passed on): a request another site's page made the browser send."""
    if own_header(ACTION_HEADER) is None and own_header(FORWARDED_HEADER) is None:
        return text(403, f"the dashboard's actions need the {ACTION_HEADER} header (the page sends it); "
                    "a request from another site's page is refused", **{OUTCOME_HEADER: NOT_APPLIED})
    if api.guard is not None:
        return text(403, "this cluster has a secret: admin actions must be signed with it; the dashboard is read-only",
                    **{OUTCOME_HEADER: NOT_APPLIED})
    node = api.runtime.node
    if node.role is Role.LEADER:
        return action()
    leader = leader_http(node.membership, node.leader_id)
    if leader is None or own_header(FORWARDED_HEADER) is not None:
        return text(503, "no leader is known right now; retry shortly", **{OUTCOME_HEADER: NOT_APPLIED})
    return forward_to(api, leader)


def ui_transfer(api: Api) -> bottle.HTTPResponse:
    """POST /ui/actions/transfer?to=ID: POST /cluster/transfer for a page, on whichever node leads."""
    return _on_the_leader(api, lambda: transfer(api))


def ui_remove(api: Api, node_id: str) -> bottle.HTTPResponse:
    """DELETE /ui/actions/members/ID: DELETE /cluster/ID for a page, on whichever node leads."""
    return _on_the_leader(api, lambda: remove_member(api, node_id))


# (method, path, route, the operation its failures are answered as): api.make_app adds them to api.ROUTES'.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("GET", "/events", get_events, "status"),
    ("GET", "/stats", get_stats, "status"),
    ("GET", "/cluster/status", cluster_status, "status"),
    ("GET", "/ui", get_ui, "status"),
    ("GET", "/ui/", get_ui, "status"),
    ("GET", "/ui/<name>", get_ui, "status"),
    ("POST", "/ui/actions/transfer", ui_transfer, "transfer"),
    ("DELETE", "/ui/actions/members/<node_id>", ui_remove, "removal"),
)
