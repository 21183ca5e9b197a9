"""Admin request signatures and the cluster secret.

With a cluster secret, every request that changes the cluster (POST /join, DELETE /cluster/ID,
POST /cluster/transfer) carries X-Raftdzmq-Timestamp (Unix seconds, a fraction allowed) and X-Raftdzmq-Signature:
the hex HMAC-SHA256 under the secret of

    "raftdzmq-admin-v1\\n" METHOD "\\n" TARGET "\\n" TIMESTAMP "\\n" BODY

where TARGET is the path and query exactly as sent (`wire_target` form). With a secret a join's body also names
the joining node's CURVE public key, and the leader's answer to a join lists the members' public keys, signed
the same way with METHOD "JOINED" and TARGET the join's signature (`answer_headers`, `verify_answer`): the
joining node admits those keys on its Raft port until its configuration is as new (raftlib.transport: "vouched
keys"). GET /cluster/keys asks one member for its newest committed configuration's keys: the asker sends a fresh
random nonce in X-Raftdzmq-Nonce and the id of the node it means to ask in X-Raftdzmq-Node, and signs the request
as above with "NONCE LF NODE_ID" as BODY (`keys_request_headers`); a node named otherwise refuses it (421). The
member answers JSON {"node_id", "index", "members": {node_id: public_key}, "http_addresses": {node_id: address}},
signed as a join's answer is (`answer_headers`, bound to the request's signature: an answer recorded for another
request, or made without the secret, does not verify), and the asker takes it only from the node it asked, and
only when that node is in the list (`read_keys_answer`; review of edge5, finding 1: a node of another cluster with
the same secret listening at a member's address answered with its own list); `parse_vouched` reads either
answer. GET /snapshot (a backup: the whole state) is signed as a keys request is, with a fresh nonce and the id of
the node asked (`node_request_headers`), refused by another node (421), and claimed by the node asked (its
AdminGuard): a recorded request downloads nothing again (review of ops, finding 5). The leader refuses a timestamp more than
ADMIN_CLOCK_SKEW_SECONDS from its own clock, and a signature already acted on: AdminGuard remembers what this
leader took, and store.AdminClaims, through the Raft log, what any leader took. A recorded request is therefore
worthless once used, everywhere, and after the window even if never used.

Rules: no gevent, Bottle or zmq: clients (raftdzmqctl, scripts) import `admin_headers` from here without
monkey-patching anything. The secret is never logged.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Mapping

from .store import ADMIN_CLOCK_SKEW_SECONDS

TIMESTAMP_HEADER = "X-Raftdzmq-Timestamp"
SIGNATURE_HEADER = "X-Raftdzmq-Signature"
NONCE_HEADER = "X-Raftdzmq-Nonce"
NODE_HEADER = "X-Raftdzmq-Node"  # GET /cluster/keys: the id of the node asked
SECRET_ENV = "RAFTDZMQ_SECRET"
KEYS_PATH = "/cluster/keys"
_TIMESTAMP = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_UNSAFE_IN_TARGET = re.compile(r"[^\x21-\x7e]|#")
_NONCE = re.compile(r"[0-9a-f]{32,128}")  # hex: at least 128 random bits
_PUBLIC_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")  # a CURVE key in Z85 text (RFC 32)


def valid_public_key(text: object) -> bool:
    """Whether `text` is a CURVE public key as Z85 text (40 characters of its alphabet: 32 bytes)."""
    return isinstance(text, str) and _PUBLIC_KEY.fullmatch(text) is not None


MIN_SECRET_BYTES = 16  # a signed header is HMAC(secret, known text): open to offline guessing (review 2 F5)


class SecretError(Exception):
    """The cluster secret was asked for and cannot be had (an unreadable or empty file, or one too short)."""


def read_secret(secret_file: str | None, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The cluster secret from `secret_file` (surrounding white space dropped), else from $RAFTDZMQ_SECRET; None
    when neither is given. Raises SecretError when the file cannot be read or is empty, or the secret is shorter
    than MIN_SECRET_BYTES."""
    if secret_file:
        try:
            with open(os.path.expanduser(secret_file), "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise SecretError(f"cannot read the secret file: {e}") from None
        if not secret:
            raise SecretError(f"the secret file {secret_file} is empty")
        where = f"the secret in {secret_file}"
    else:
        secret = environ.get(SECRET_ENV, "").strip().encode()
        if not secret:
            return None
        where = f"${SECRET_ENV}"
    if len(secret) < MIN_SECRET_BYTES:
        # No stretching (a KDF) makes a short secret safe here: clients sign with the plain HMAC (curl, openssl).
        raise SecretError(f"{where} has {len(secret)} bytes: a cluster secret needs at least {MIN_SECRET_BYTES} bytes "
                          "(make one with: openssl rand -hex 32)")
    return secret


def wire_target(raw: str) -> str:
    """The request target as sent (a str of latin-1 bytes), fit to send on: a byte outside printable ASCII, or a
    `#`, percent-encoded. The receiver decodes PATH_INFO the same either way, so a signature, a forwarded request
    or a redirect names exactly the key and query the client sent; `%`, `?`, `..` and `/` pass through untouched."""
    return _UNSAFE_IN_TARGET.sub(lambda m: "%%%02X" % ord(m.group()), raw)


def admin_signature(secret: bytes, method: str, target: str, body: bytes, timestamp: str) -> str:
    """The signature of an admin request: `target` is the path and query as sent (latin-1 text of its bytes)."""
    message = f"raftdzmq-admin-v1\n{method}\n{wire_target(target)}\n{timestamp}\n".encode("latin-1") + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def admin_headers(secret: bytes, method: str, target: str, body: bytes = b"", now: float | None = None
                  ) -> dict[str, str]:
    """The two headers that sign an admin request, for clients (raftdzmqctl, scripts, `-sign`). A non-ASCII
    `target` is taken as UTF-8, as clients send it."""
    timestamp = f"{time.time() if now is None else now:.6f}"
    target = target.encode("utf-8").decode("latin-1")
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: admin_signature(secret, method, target, body, timestamp)}


def answer_headers(secret: bytes, request_signature: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers that sign the leader's answer `body` to the signed admin request `request_signature`: the
    answer cannot be made without the secret, nor be one given to another request."""
    timestamp = f"{time.time() if now is None else now:.6f}"
    return {TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: admin_signature(secret, "JOINED", request_signature, body, timestamp)}


def verify_answer(secret: bytes, request_signature: str, body: bytes, headers: Mapping[str, str]) -> bool:
    """Whether `body` is an answer to `request_signature` signed with `secret` (answer_headers)."""
    timestamp, signature = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
    if not timestamp or not signature or not _TIMESTAMP.fullmatch(timestamp):
        return False
    expected = admin_signature(secret, "JOINED", request_signature, body, timestamp)
    return hmac.compare_digest(signature.encode("latin-1", errors="replace"), expected.encode())


def valid_nonce(text: object) -> bool:
    """Whether `text` is a nonce as GET /cluster/keys wants it: 32 to 128 lowercase hex digits."""
    return isinstance(text, str) and _NONCE.fullmatch(text) is not None


def keys_request_body(nonce: str, node_id: str) -> bytes:
    """What a request to one node (GET /cluster/keys, GET /snapshot) signs as its body: its nonce and the id of
    the node it asks."""
    return f"{nonce}\n{node_id}".encode("utf-8")


def node_request_headers(secret: bytes, node_id: str, method: str, target: str, nonce: str | None = None,
                         now: float | None = None) -> dict[str, str]:
    """The headers of a signed request to the node `node_id` alone (GET /cluster/keys, GET /snapshot): a fresh
    nonce (128 random bits, unless given), the id asked, and the admin signature with both as the body
    (keys_request_body)."""
    nonce = os.urandom(16).hex() if nonce is None else nonce
    return {NONCE_HEADER: nonce, NODE_HEADER: node_id,
            **admin_headers(secret, method, target, keys_request_body(nonce, node_id), now)}


def keys_request_headers(secret: bytes, node_id: str, nonce: str | None = None, now: float | None = None
                         ) -> dict[str, str]:
    """The headers of a signed GET /cluster/keys to the node `node_id` (node_request_headers)."""
    return node_request_headers(secret, node_id, "GET", KEYS_PATH, nonce, now)


def parse_vouched(body: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    """(index, members' public keys, members' HTTP addresses) from a signed answer listing a configuration (a
    join's or GET /cluster/keys'; verify it first). ValueError when it is not one: an index that is not a positive
    integer, or a member whose key is not a CURVE public key (review 3 F3: a cluster made before node keys)."""
    try:
        parsed = json.loads(body)
        index, members = parsed["index"], parsed["members"]
        http_addresses = parsed.get("http_addresses", {})
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a list of members' keys ({e})") from None
    if not isinstance(index, int) or isinstance(index, bool) or index < 1:
        raise ValueError("not a list of members' keys (no configuration index)")
    if not isinstance(members, dict) or not isinstance(http_addresses, dict):
        raise ValueError("not a list of members' keys")
    keyless = sorted(str(k) for k, v in members.items() if not valid_public_key(v))
    if keyless:
        raise ValueError(f"no node key for {', '.join(keyless)}")
    http_addresses = {k: v for k, v in http_addresses.items()
                      if k in members and isinstance(v, str) and 0 < len(v) < 256}
    return index, dict(members), http_addresses


def read_keys_answer(secret: bytes, request_headers: Mapping[str, str], body: bytes,
                     headers: Mapping[str, str]) -> tuple[int, dict[str, str], dict[str, str]]:
    """The asker's side of GET /cluster/keys: (index, members' keys, HTTP addresses) from the answer `body` to the
    request made with `request_headers` (keys_request_headers). ValueError when the answer is not signed with
    `secret` for that very request (made without the secret, or recorded for another request: a replay), is not
    a list of keys, or does not come from the node asked, a member of that list (review of edge5, finding 1:
    another cluster's node with the same secret, at the address asked, answered with its own list)."""
    if not verify_answer(secret, request_headers.get(SIGNATURE_HEADER, ""), body, headers):
        raise ValueError("not signed for our request with this cluster's secret")
    index, members, http_addresses = parse_vouched(body)
    asked, answerer = request_headers.get(NODE_HEADER), json.loads(body).get("node_id")
    if answerer != asked:
        raise ValueError(f"answered by {answerer!r}, not by {asked!r}, the node asked")
    if answerer not in members:
        raise ValueError(f"{answerer} is not a member of the configuration it lists")
    return index, members, http_addresses


class AdminGuard:
    """Checks admin signatures on one node. `verify` is pure apart from the clock; `claim` records a signature the
    leader is about to act on, and refuses one it has seen (memory: one entry per accepted admin request of the
    last 2 x ADMIN_CLOCK_SKEW_SECONDS; only correctly signed requests get in). Only this node's memory: a replay to
    this leader costs no log entry; store.AdminClaims is what holds across leaders. Every entry lives the same
    time, so entries expire in the order they came: a claim drops the expired ones from the front of that order,
    O(1) amortized (review of edge5, finding 3: past 256 live entries every claim rebuilt the whole table).
    GET /cluster/keys claims nothing (its answer is bound to the request's fresh nonce: a replay gains nothing)."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.monotonic) -> None:
        self.secret = secret
        self._clock = clock
        self._seen: dict[str, float] = {}  # signature -> clock() when it may be forgotten
        self._expiry_order: collections.deque[tuple[float, str]] = collections.deque()  # (that time, signature)

    def verify(self, method: str, target: str, body: bytes, timestamp: str | None, signature: str | None,
               now: float | None = None) -> str | None:
        """None when the request is signed with the secret within the allowed skew, else why not."""
        if not signature or not timestamp:
            return "not signed with this cluster's secret (no signature)"
        if not _TIMESTAMP.fullmatch(timestamp):
            return "malformed timestamp: want Unix seconds"
        expected = admin_signature(self.secret, method, target, body, timestamp)
        # Compared as ASCII: a value of other characters (a header's bytes as UTF-8 text, "\u20ac") is no signature,
        # and encoding it must not raise (review edge3, L3).
        if not signature.isascii() or not hmac.compare_digest(signature.encode("ascii"), expected.encode()):
            return "not signed with this cluster's secret (the signature does not match)"
        skew = float(timestamp) - (time.time() if now is None else now)
        if abs(skew) > ADMIN_CLOCK_SKEW_SECONDS:
            return (f"signature timestamp is {skew:+.0f}s from this node's clock (allowed: "
                    f"{ADMIN_CLOCK_SKEW_SECONDS:g}s); sign again, or check the clocks")
        return None

    def claim(self, signature: str) -> str | None:
        """Record `signature` as used; None if it was new, else why it is refused."""
        now = self._clock()
        order = self._expiry_order
        while order and order[0][0] <= now:
            _, expired = order.popleft()
            del self._seen[expired]
        if signature in self._seen:
            return "this signed request was already used (a replay); sign it again"
        # The clock never goes back and the lifetime is fixed: appending keeps `order` sorted by expiry.
        expires = now + 2 * ADMIN_CLOCK_SKEW_SECONDS
        assert not order or order[-1][0] <= expires
        self._seen[signature] = expires
        order.append((expires, signature))
        return None

    @property
    def remembered(self) -> int:
        """How many signatures are remembered (expired ones go at the next claim)."""
        return len(self._seen)
