"""The dashboard's routes: GET /events (this node's event ring), GET /stats (this node's numbers for a page),
GET /cluster/status (every member's, gathered by this node), and GET /ui with its assets (the page itself, in
raftlib/server/ui/, shipped as package data).

Rules:
- Cheap: nothing here runs unless a page (or someone) asks. No greenlet, no timer, no extra metric; the numbers
  are those the node keeps anyway (raftlib.server.metrics, the runtime's status and its event ring).
- GET /cluster/status answers for the whole cluster from one origin: this node asks each other member of its
  configuration for GET /stats at once, each in a greenlet of its own, within MEMBER_TIMEOUT_SECONDS (connect,
  send and read together), and answers once all have answered or the bound passed. A member that did not answer
  in time, or answered other than 200 with JSON, is `"up": false` with the reason. This node's own numbers come
  from memory, never over HTTP. The members listed are the configuration of the leader when one answered (its
  match indices give each follower's lag), else this node's.
- The event ring's sequence numbers are per process (raftlib.events): GET /cluster/status?events_since=ID:SEQ,...
  passes each member the newest sequence number the page has of it and returns only newer events, each with its
  node's id, oldest first by wall-clock time (the nodes' clocks are not synchronised: the order across nodes is
  as good as their clocks).
- The page's actions use the ordinary admin routes (POST /cluster/transfer, DELETE /cluster/ID). With a cluster
  secret they must be signed, which a browser cannot do without the secret: GET /cluster/status says
  `"admin_guarded": true` and the page then shows the actions as unavailable, read-only.
- GET /ui serves index.html; GET /ui/NAME serves only the files named in ASSETS (no path from the request reaches
  the file system). The files are read once, on first request, and kept in memory.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable

import bottle
import gevent

from raftlib.messages import Role

from .api import (FORWARDED_HEADER, NOT_APPLIED, OUTCOME_HEADER, Api, forward_to, json_answer, leader_http, members,
                  remove_member, text, transfer)

MEMBER_TIMEOUT_SECONDS = 0.5  # each member gets this long to answer GET /stats, all asked at once
MAX_MEMBER_ANSWER_BYTES = 1 << 20
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
        "keys": len(api.store), "time": time.time(), "elections_won": status.stats["elections_won"],
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


def ask_member(connect: Callable[..., http.client.HTTPConnection], address: str, path: str) -> dict:
    """GET `path` of the member at `address` as JSON, within MEMBER_TIMEOUT_SECONDS in all; OSError, ValueError or
    HTTPException when it does not answer so."""
    host, _, port = address.rpartition(":")
    conn = connect(host, int(port), timeout=MEMBER_TIMEOUT_SECONDS)
    try:
        with gevent.Timeout(MEMBER_TIMEOUT_SECONDS, OSError(f"no answer within {MEMBER_TIMEOUT_SECONDS:g}s")):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read(MAX_MEMBER_ANSWER_BYTES)
        if resp.status != 200:
            raise OSError(f"answered {resp.status}")
        answer = json.loads(body)
        if not isinstance(answer, dict):
            raise ValueError("not a JSON object")
        return answer
    finally:
        conn.close()


# A member's fields as its GET /stats names them: null for a member that did not answer.
MEMBER_FIELDS = ("role", "term", "leader", "commit_index", "applied_index", "last_index", "snapshot_index",
                 "disk_full", "keys", "time", "writes", "reads", "histograms", "removed")


def _member_row(member: dict, stats: dict | None, error: str | None) -> dict:
    row = {"id": member["id"], "raft_address": member["raft_address"], "http_address": member["http_address"],
           "voter": member["role"] == "voter", "up": stats is not None, "error": error}
    row.update({k: None if stats is None else stats.get(k) for k in MEMBER_FIELDS})
    return row


def cluster_status(api: Api) -> bottle.HTTPResponse:
    """GET /cluster/status (the module's rules)."""
    raw = bottle.request.query.get("events_since", "")
    try:
        events_since = parse_events_since(raw)
    except ValueError as e:
        return text(400, f"events_since must be ID:SEQ,ID:SEQ...: {e}")
    me = api.runtime.node.node_id
    own = stats_of(api, events_since.get(me, 0))
    others = [m for m in own["members"] if m["id"] != me and m["http_address"]]
    asked = {m["id"]: gevent.spawn(ask_member, api.connect, m["http_address"],
                                   f"/stats?events_since={events_since.get(m['id'], 0)}") for m in others}
    gevent.joinall(list(asked.values()), timeout=MEMBER_TIMEOUT_SECONDS + 0.1)
    answers: dict[str, dict | None] = {me: own}
    errors: dict[str, str] = {}
    for node_id, greenlet in asked.items():
        if greenlet.successful():
            answers[node_id] = greenlet.value
        else:
            greenlet.kill(block=False)
            answers[node_id] = None
            errors[node_id] = str(greenlet.exception) if greenlet.ready() else "no answer in time"
    leaders = [a for a in answers.values() if a is not None and a.get("role") == Role.LEADER.value]
    leader = max(leaders, key=lambda a: a.get("term", 0)) if leaders else None
    configuration = leader["members"] if leader is not None else own["members"]
    rows = []
    for member in configuration:
        stats = answers.get(member["id"])
        row = _member_row(member, stats, errors.get(member["id"], None if stats is not None else
                                                    "not asked: not in this node's configuration yet"))
        match_index = member.get("match_index") if leader is not None else None
        row["match_index"] = match_index
        row["lag"] = None if match_index is None or leader is None else max(0, leader["last_index"] - match_index)
        rows.append(row)
    events: list[dict] = []
    for node_id, stats in answers.items():
        if stats is not None and isinstance(stats.get("events"), dict):
            ring = stats["events"]
            events.extend({**e, "node": node_id} for e in ring.get("events", ()) if isinstance(e, dict))
    events.sort(key=lambda e: (e.get("time", 0), e.get("node"), e.get("seq", 0)))
    last_seq = {node_id: stats["events"].get("last_seq") for node_id, stats in answers.items()
                if stats is not None and isinstance(stats.get("events"), dict)}
    return json_answer({"node_id": me, "time": time.time(), "leader": leader and leader["node_id"],
                        "term": leader and leader["term"], "admin_guarded": api.guard is not None,
                        "members": rows, "events": events, "events_last_seq": last_seq})


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
    if content_type is None:
        return text(404, f"no such file of the dashboard: {name}")
    # The page may change with the node's version: asked again each time (cheap: a few KB from memory).
    return bottle.HTTPResponse(asset(name), 200, {"Content-Type": content_type, "Cache-Control": "no-cache",
                                                  "X-Content-Type-Options": "nosniff"})


def _on_the_leader(api: Api, action: Callable[[], bottle.HTTPResponse]) -> bottle.HTTPResponse:
    """A page's action: run it here when this node leads, else pass it to the leader (one hop: a forwarded
    request that finds no leader here is answered 503). Refused (403) with a cluster secret: it would have to be
    signed, and the page has no secret."""
    if api.guard is not None:
        return text(403, "this cluster has a secret: admin actions must be signed with it; the dashboard is read-only",
                    **{OUTCOME_HEADER: NOT_APPLIED})
    node = api.runtime.node
    if node.role is Role.LEADER:
        return action()
    leader = leader_http(node.membership, node.leader_id)
    if leader is None or bottle.request.get_header(FORWARDED_HEADER) is not None:
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
