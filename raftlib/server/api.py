"""The HTTP API's WSGI application: make_app installs every group of routes, each a module of module-level
functions of an `Api`, behind one callback per route (_serving) that refuses a cross-site write and gives every
failure its answer (routes_shared.failure_answer).

The groups, by concern (ROUTES joins the tables of the first six, in this order; make_app adds the dashboard's):
- routes_kv: /db (keys: writes, reads at a consistency, pages, a prefix's deletion)
- routes_txn: POST /txn
- routes_watch: GET /watch (streams and long polls)
- routes_leases: /lease (grants, keepalives, revocations, listings)
- routes_cluster: POST /join, /cluster (members, keys, removal, transfer)
- routes_ops: /status, /livez, /readyz, /metrics, GET /snapshot (a backup)
- dashboard: /ui, /stats, /events, /cluster/status
routes_shared holds what they share, and the rules every route keeps (answers, outcomes, bounds, the feature
level); `Api`, `NodeView` and `Raft` are importable from here too.

Rules:
- A request of another method than GET, HEAD or OPTIONS that a page of another site made a browser send is
  refused 403 (`_serving`: Sec-Fetch-Site cross-site or same-site, or an Origin whose host:port is not the
  request's Host), with or without a secret: a page an operator opens cannot write to a node on localhost (CSRF).
  curl, the Python client, raftdzmqctl and a follower's forward send no Origin; the dashboard is same-origin.
  A page whose own name was rebound to the node's address is same-origin too: the edge refuses its requests
  before any route, by their Host (raftlib.server.hosts).
- A write's answer that is not a success and names no X-Raft-Outcome gets one here (with_outcome: routes_shared's
  rules), Bottle's own errors (404 no such route, 405, 500) included.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

import bottle

from . import routes_cluster, routes_kv, routes_leases, routes_ops, routes_txn, routes_watch
from .dashboard import ROUTES as DASHBOARD_ROUTES
from .edge import WRITE_METHODS
from .routes_shared import (ANSWERED_FAILURES, NOT_APPLIED, OUTCOME_HEADER, UNKNOWN, Api, NodeView, Raft, failure_answer,
                            text)

__all__ = ["ROUTES", "Api", "NodeView", "Raft", "cross_site_refusal", "make_app", "with_outcome"]


# (method, path, route, the operation its failures are answered as): every group's but the dashboard's.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    routes_kv.ROUTES + routes_txn.ROUTES + routes_watch.ROUTES + routes_leases.ROUTES + routes_cluster.ROUTES
    + routes_ops.ROUTES)


SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))  # the methods a cross-site request may use (the module's rules)


def cross_site_refusal(req: bottle.BaseRequest) -> bottle.HTTPResponse | None:
    """403 for a request of another method than SAFE_METHODS that a page of another site made a browser send
    (Sec-Fetch-Site cross-site or same-site, or an Origin whose host:port is not the request's Host); else None.
    A request with neither header (curl, the clients, a follower's forward: nearly every write) is let through on
    two lookups in the environ: get_header would build Bottle's header dict and raise and catch a KeyError for each
    missing header, ~7 us of every write on the leader (docs/BENCHMARKS.md). The values are read from the environ
    too, as UTF-8 text as Bottle reads them; a check that cannot read them (not UTF-8, an Origin urlsplit cannot
    split) refuses 403 with its reason: get_header raised there, a 500 and a traceback a request."""
    environ = req.environ
    if environ.get("REQUEST_METHOD", "GET").upper() in SAFE_METHODS:  # BaseRequest.method's own rule
        return None
    origin = environ.get("HTTP_ORIGIN")
    fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
    if origin is None and fetch_site is None:
        return None
    try:
        if fetch_site is not None and _header_text(fetch_site) in ("cross-site", "same-site"):
            return _cross_site_answer()
        if origin is None or (urllib.parse.urlsplit(_header_text(origin)).netloc.lower()
                              == _header_text(environ.get("HTTP_HOST", "")).lower()):
            return None
    except ValueError as e:  # UnicodeDecodeError; urlsplit's "Invalid IPv6 URL"
        return text(403, f"refused: the cross-site check cannot read the Origin, Sec-Fetch-Site or Host header ({e})")
    return _cross_site_answer()


def _header_text(value: str) -> str:
    """A header's value in the environ (its bytes as latin-1, PEP 3333) as the UTF-8 text Bottle's get_header gives;
    UnicodeDecodeError when it is not UTF-8."""
    return value.encode("latin-1").decode("utf-8")


def _cross_site_answer() -> bottle.HTTPResponse:
    """The 403 of a write a page of another site made a browser send."""
    return text(403, "refused: sent by a page of another site (Origin or Sec-Fetch-Site); "
                "send it without those headers or from this node's own page")


WRITE_OPERATIONS = frozenset(("write", "keepalive", "join", "removal", "transfer"))  # the operations whose answers name an outcome


def _serving(api: Api, route: Callable[..., object], operation: str) -> Callable[..., object]:
    """The callback Bottle calls for `route`: a closure rather than functools.partial, one layer less per request."""

    if operation not in WRITE_OPERATIONS:
        def serve(**url_args: str) -> object:
            try:
                refusal = cross_site_refusal(bottle.request)
                if refusal is not None:
                    return refusal
                return route(api, **url_args)
            except ANSWERED_FAILURES as e:
                return failure_answer(api, operation, e)

        return serve

    def serve_write(**url_args: str) -> object:
        try:
            refusal = cross_site_refusal(bottle.request)
            answer = refusal if refusal is not None else route(api, **url_args)
        except bottle.HTTPResponse as e:  # a route's refusal of bad input (check_key)
            answer = e
        except ANSWERED_FAILURES as e:
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
    app = bottle.Bottle(catchall=True)
    app.default_error_handler = _default_error
    for method, path, route, operation in ROUTES + DASHBOARD_ROUTES:
        app.route(path, method, _serving(api, route, operation))
    return app
