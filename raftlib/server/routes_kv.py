"""The key/value routes: POST/PUT /db/KEY (a write; ?prev_value=V, ?prev_exist=false or ?prev_index=N compare
first, ?ttl=S or ?lease=ID put the key on a lease), DELETE /db/KEY (?prev_index=N), GET /db/KEY (a read at the
consistency asked for: routes_shared.wait_consistent), GET /db/ (a page of keys) and DELETE /db/?prefix=P.
?prev_index, ?ttl, ?lease (but ?lease=0) and ?prefix are of feature level 2 (routes_shared's rules). POST
/db/KEY?ttl=S answers the TTL granted in X-Raft-Lease-TTL; ?lease=0 is no lease (etcd). A compare that fails
answers 412 (precondition_failed)."""

from __future__ import annotations

import time
from collections.abc import Callable

import bottle

from .routes_shared import (MAX_KEY_BYTES, Api, check_key, json_answer, json_string, keys_within, parse_lease_id,
                            propose, read_body, read_headers, require_leader, require_level_2, text, ttl_seconds, wait_consistent)
from .store import (COMPARE_AND_SET, CREATE, DELETE, DELETE_IF_INDEX, DELETE_PREFIX, MAX_DELETE_KEYS_PER_ENTRY,
                    MAX_KEYS_PER_LEASE, MAX_LEASES, PUT_WITH_TTL, SET, SET_IF_INDEX, SET_WITH_LEASE, NoLease, command)


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


def precondition_failed(api: Api, key: str, index: int) -> bottle.HTTPResponse:
    """412, with the key's modify index as this node applied it (0 when missing) from feature level 2 on, so that a
    compare-and-set loop needs no GET (review of coord1, Q3). It is as of this answer: a later write may change it."""
    headers = {"X-Raft-Index": str(index)}
    if api.store.feature_level >= 2:
        record = api.store.record(key)
        headers["X-Raft-Modify-Index"] = str(0 if record is None else record[2])
    return text(412, "precondition failed", **headers)


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
    # Cut at MAX_PAGE_BYTES of JSON too: "next" then names the last key listed, as when `limit` stops a page. The
    # keys are encoded once, and the answer is written of them (the same text as json_answer's).
    encoded, cut = keys_within(page)
    last = json_string(page[len(encoded) - 1]) if (more or cut) and encoded else "null"
    body = '{"keys": [' + ", ".join(encoded) + '], "next": ' + last + "}\n"
    return bottle.HTTPResponse(body, 200, {"Content-Type": "application/json", **read_headers(api)})


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


# (method, path, route, the operation its failures are answered as): api.make_app installs them.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("POST", "/db/<key:path>", set_key, "write"),
    ("PUT", "/db/<key:path>", set_key, "write"),
    ("DELETE", "/db/<key:path>", delete_key, "write"),
    ("GET", "/db/<key:path>", get_key, "read"),
    ("GET", "/db/", list_keys, "read"),
    ("GET", "/db", list_keys, "read"),
    ("DELETE", "/db/", delete_prefix, "write"),
    ("DELETE", "/db", delete_prefix, "write"),
)
