"""POST /txn (issue 14, feature level 2): compares, then the success or the failure ops, in one entry (store: TXN).
Its JSON body is checked whole before it is proposed (parse_txn, then the store's own txn_problem: 400 naming the
first problem); its answer is written as text where that is cheaper (txn_answer_json)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable

import bottle

from .routes_shared import MAX_KEY_BYTES, Api, json_string, propose, read_body, require_leader, require_level_2, text
from .store import MAX_KEYS_PER_LEASE, MAX_TXN_GET_BYTES, MAX_TXN_GET_KEYS, MAX_TXN_OPS, TXN, NoLease, TxnResult, command, txn_problem


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


# A txn's answer holds at most this many bytes of key-values as JSON (txn_answer_json): twice the store's raw
# MAX_TXN_GET_BYTES (text that escapes a little, base64 at 4/3, CJK at 2x) and the fields of its most keys. What
# escapes more is cut short by it: control bytes (6x) and, with json.dumps' ensure_ascii, 2-byte UTF-8 text and
# emoji (3x: review ef, Q1; README says so).
MAX_TXN_ANSWER_BYTES = 2 * MAX_TXN_GET_BYTES + 100 * MAX_TXN_GET_KEYS
ANSWER_SLICE_BYTES = 128 << 10  # raw bytes of a txn answer's key-values encoded between two passes through TurnGate


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


def txn_answer_json(result: TxnResult, index: int,
                    turn: Callable[[list[bytes]], bool] | None = None) -> str | bytes:
    """POST /txn's answer, the same text as json_answer of {"succeeded", "index", "results": [_txn_answer(r) ...]}
    (tests/test_http_api.py compares them), with each put's result (most of them) written as text rather than
    built as a dict and encoded: a 10-put txn's answer is ~4x cheaper.

    Gets: their key-values count against MAX_TXN_ANSWER_BYTES as the JSON they are written as (the store's
    MAX_TXN_GET_BYTES counts raw bytes, and JSON escapes made 4 MiB of control bytes a 24 MB answer: review edge,
    L1); past it a get says "more": true, as past the store's bounds, and so does every later get that found
    anything. Not a 4xx: the entry is committed, its puts and deletes applied, and the client needs the answer
    that says so; "more" already tells it to read the rest with a get of its own. A key-value's JSON is never
    shorter than its raw bytes, so one past the bound by those is cut without being encoded.

    `turn(pieces)` (post_txn's: the edge's TurnGate, the answer so far held in the node's budget meanwhile) is
    called before the piece that brings the raw bytes encoded since the last call to ANSWER_SLICE_BYTES (a value
    is encoded that many characters at a time: _kv_json), so that a big answer is built over many turns of the
    event loop, at most a few ms each, its timers run in between, and many big answers at once take their turns
    as requests do; a small answer never calls it. When it returns False (the client was cut meanwhile) no more
    key-values go in."""
    head = f'{{"succeeded": {"true" if result.succeeded else "false"}, "index": {index}, "results": ['
    if all(r[0] == "put" for r in result.results):
        results = ", ".join(f'{{"op": "put", "key": {json_string(r[1])}}}' for r in result.results)
        return f"{head}{results}]}}\n"
    # As bytes, joined once: a big answer is not copied again from text (ASCII: ensure_ascii) to bytes.
    pieces = [head.encode()]
    budget = MAX_TXN_ANSWER_BYTES
    since_turn = 0

    def paced(cost: int) -> bool:
        """Before `cost` raw bytes of encoding: pass `turn` once ANSWER_SLICE_BYTES were encoded since the last
        pass; False when the client was cut meanwhile."""
        nonlocal since_turn
        since_turn += cost
        if turn is None or since_turn < ANSWER_SLICE_BYTES:
            return True
        since_turn = cost
        return turn(pieces)

    for i, r in enumerate(result.results):
        if i:
            pieces.append(b", ")
        if r[0] == "put":
            pieces.append(f'{{"op": "put", "key": {json_string(r[1])}}}'.encode())
        elif r[0] == "delete":
            pieces.append(json.dumps(_txn_answer(r)).encode())
        else:
            pieces.append(b'{"op": "get", "kvs": [')
            more, first = r[2], True
            for k, v, c, m in r[1]:
                start = len(pieces)
                if not first:
                    pieces.append(b", ")
                size = _kv_json(k, v, c, m, pieces, paced) if len(k) + len(v) <= budget else None
                if size is None or size > budget:
                    del pieces[start:]
                    more, budget = True, 0  # the bound ends every later get too, as the store's does
                    break
                budget -= size
                first = False
            pieces.append(b'], "more": true}' if more else b"]}")
    pieces.append(b"]}\n")
    return b"".join(pieces)


def _kv_json(key: str, value: bytes, create_index: int, modify_index: int, pieces: list[bytes],
             paced: Callable[[int], bool]) -> int | None:
    """Append one key-value's JSON to `pieces` (the caller takes it out again past its bound), the same bytes as json.dumps({"key", _json_value(value),
    "create_index", "modify_index"}), its value encoded ANSWER_SLICE_BYTES characters at a time with `paced`
    before each (a 1 MB value of control bytes is 6 MB of JSON: ~20 ms in one go); its length, or None when
    `paced` said the client was cut."""
    try:
        text, field = value.decode(), b', "value": "'
    except UnicodeDecodeError:
        text, field = base64.b64encode(value).decode(), b', "value_base64": "'
    if not paced(len(key)):
        return None
    start = len(pieces)  # in `pieces` as it is made: what waits for a turn counts in the budget (_answer_turn)
    pieces.append(b'{"key": ' + json_string(key).encode() + field)
    for at in range(0, len(text), ANSWER_SLICE_BYTES):
        part = text[at:at + ANSWER_SLICE_BYTES]
        if not paced(len(part)):
            return None
        pieces.append(json_string(part)[1:-1].encode())  # a slice of a str ends between code points: safe to cut
    pieces.append(f'", "create_index": {create_index}, "modify_index": {modify_index}}}'.encode())
    return sum(map(len, pieces[start:]))


def _answer_turn(handler) -> Callable[[list[bytes]], bool]:
    """txn_answer_json's `turn` on the edge: the answer made so far counts in the node's budget of unsent answers
    while it waits for its turn of the loop (a hundred big answers waiting there at once are no less memory than a
    hundred unread), as an answer being made (EdgeServer.hold: not offered to its client, so not stalled: it ranks as
    begun at its latest turn, after the non-readers offered their answer before it, and before readers); False when
    it was cut meanwhile. The request's end lets go of it (or its send, which holds what the socket does not take)."""
    server = handler.server

    def turn(pieces: list[bytes]) -> bool:
        server.hold(handler, pieces, making=True)
        server.gate.enter()
        return handler in server.holding  # else cut: its connection is shut, the answer would go nowhere

    return turn


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
    handler = bottle.request.environ.get("raftdzmq.handler")  # None in process (tests)
    if handler is None:
        return txn_answer_json(result, index)
    return txn_answer_json(result, index, _answer_turn(handler))


# (method, path, route, the operation its failures are answered as): api.make_app installs them.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("POST", "/txn", post_txn, "write"),
)
