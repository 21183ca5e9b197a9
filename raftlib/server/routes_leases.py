"""The lease routes: POST /lease (a grant), GET /lease (a page of them), GET /lease/ID, DELETE /lease/ID (a
revocation), POST /lease/ID/keepalive and POST /lease/keepalive (many at once).

Rules:
- Leases (issue 14 part 2; level 2 too): every lease route is the leader's (a follower answers 307, or forwards
  with -forward, as for writes), since only the leader knows when a lease expires (raftlib.server.leases). A
  lease id is the decimal text of the grant's log index. A TTL is whole seconds, at most MAX_TTL_SECONDS; one
  below `min_ttl_seconds` (1.5 election timeouts, at least 1 s, as etcd's minimum) is raised to it and the answer
  says the TTL granted. A keepalive confirms leadership with a read round (no log entry) after noting when it
  arrived, then extends the lease (LeaseKeeper.keepalive); 404 once the lease is gone or being expired (the text
  says which). POST /lease/keepalive keeps up to MAX_KEEPALIVE_IDS leases alive behind one read round, answering
  each as its own keepalive would (an error per id, never a 404 for the whole).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import bottle

from raftlib.core import NotLeader

from .leases import LeaseKeeper
from .routes_shared import (NOT_APPLIED, OUTCOME_HEADER, Api, json_answer, keys_within, parse_lease_id, propose, read_body,
                            require_leader, require_level_2, text, ttl_seconds)
from .store import LEASE_GRANT, LEASE_REVOKE, MAX_LEASES, command


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
    # The first MAX_LEASE_KEYS_LISTED, and no more than MAX_PAGE_BYTES of them as JSON (review edge3, L2): "key_count"
    # says how many there are; GET /db/?prefix= pages through them when the lease's keys share a prefix.
    listed = len(keys_within(keys[:MAX_LEASE_KEYS_LISTED])[0])
    return json_answer({"id": str(lid), "ttl": lease.ttl_seconds, "remaining": round(remaining or 0.0, 3),
                        "keys": keys[:listed], "key_count": len(keys)})


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


# (method, path, route, the operation its failures are answered as): api.make_app installs them.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("POST", "/lease", grant_lease, "write"),
    ("GET", "/lease", list_leases, "lease"),
    ("POST", "/lease/keepalive", keepalive_leases, "keepalive"),
    ("POST", "/lease/<lease_id>/keepalive", keepalive_lease, "keepalive"),
    ("GET", "/lease/<lease_id>", get_lease, "lease"),
    ("DELETE", "/lease/<lease_id>", revoke_lease, "write"),
)
