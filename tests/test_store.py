"""raftlib.server.store in process: every command and its result, snapshots and their formats, pages of keys, a
random history against a dict (hypothesis), and the module's purity (no gevent, Bottle, zmq or clock)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftlib.server import store
from raftlib.server.store import (
    ADMIN_CLAIM,
    COMPARE_AND_SET,
    CREATE,
    DELETE,
    SET,
    CLAIM_RETENTION_SECONDS,
    SNAPSHOT_WITH_CLAIMS,
    SNAPSHOT_WITH_CLAIMS_V2,
    KeyValueStore,
    command,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def values(kv: KeyValueStore) -> dict[str, bytes]:
    """The key -> value map of the store's records."""
    return {key: record[0] for key, record in kv.data.items()}


def applied(*commands: bytes) -> tuple[KeyValueStore, list[str]]:
    kv = KeyValueStore()
    return kv, [kv.apply(i + 1, c) for i, c in enumerate(commands)]


def test_set_creates_and_overwrites():
    kv, results = applied(command(SET, "a", b"1"), command(SET, "a", b"2"), command(SET, "b", b""))
    assert results == ["ok", "ok", "ok"]
    assert values(kv) == {"a": b"2", "b": b""} and list(kv.keys) == ["a", "b"] and len(kv) == 2
    assert kv.get("a") == b"2" and kv.get("b") == b"" and kv.get("c") is None


def test_delete_answers_missing_for_a_key_that_is_not_there():
    kv, results = applied(command(SET, "a", b"1"), command(DELETE, "a"), command(DELETE, "a"), command(DELETE, "z"))
    assert results == ["ok", "ok", "missing", "missing"]
    assert values(kv) == {} and list(kv.keys) == []


def test_compare_and_set_sets_only_on_the_expected_value():
    kv, results = applied(command(SET, "a", b"1"), command(COMPARE_AND_SET, "a", b"3", b"2"),
                          command(COMPARE_AND_SET, "a", b"3", b"1"), command(COMPARE_AND_SET, "new", b"x", b""))
    assert results == ["ok", "failed", "ok", "failed"]
    assert values(kv) == {"a": b"3"}
    # An expected value of None matches a missing key (HTTP always sends bytes: prev_value= is b"").
    assert kv.apply(5, command(COMPARE_AND_SET, "fresh", b"x", None)) == "ok" and kv.get("fresh") == b"x"
    assert list(kv.keys) == ["a", "fresh"]


def test_create_only_when_the_key_is_missing():
    kv, results = applied(command(CREATE, "a", b"1"), command(CREATE, "a", b"2"))
    assert results == ["ok", "failed"] and values(kv) == {"a": b"1"}


def test_an_unknown_op_applies_as_nothing_and_junk_as_an_error():
    kv, results = applied(command(SET, "a", b"1"), command(99, "a", b"2"), b"\xff\x00junk", cbor2.dumps([SET, "a"]))
    assert results == ["ok", "ok", "error", "error"]
    assert values(kv) == {"a": b"1"}


def test_admin_claims_take_a_signature_once_and_forget_it_after_the_window():
    now = 1_700_000_000.0
    kv, results = applied(command(ADMIN_CLAIM, "sig1", b"", [now, now]), command(ADMIN_CLAIM, "sig1", b"", [now, now]),
                          command(ADMIN_CLAIM, "sig2", b"", [now, now + 1]))
    assert results == ["ok", "used", "ok"]
    assert values(kv) == {} and kv.admin_claims.claims == {"sig1": now, "sig2": now}
    assert kv.admin_claims.horizon == now + 1 - CLAIM_RETENTION_SECONDS
    # Malformed claims (another version's) claim nothing.
    for bad in ([now], [now, "x"], "when", None):
        assert kv.apply(9, command(ADMIN_CLAIM, "sig3", b"", bad)) == "error"
    assert kv.apply(9, command(ADMIN_CLAIM, 7, b"", [now, now])) == "error"
    assert "sig3" not in kv.admin_claims.claims
    # CLAIM_RETENTION_SECONDS later (by the leader's clock in the command), the old claims are gone ...
    later = now + CLAIM_RETENTION_SECONDS + 1
    assert kv.apply(10, command(ADMIN_CLAIM, "sig4", b"", [later, later])) == "ok"
    assert kv.admin_claims.claims == {"sig4": later}
    # ... and a forgotten claim is refused, not taken again, whatever the clock of the leader that proposes it (a
    # slow one would have let its timestamp through: issue 17's second review, F4).
    for leader_clock in (later, now, now - 10_000):
        assert kv.apply(11, command(ADMIN_CLAIM, "sig1", b"", [now, leader_clock])) == "expired"
    assert kv.apply(12, command(ADMIN_CLAIM, "sig5", b"", [later - 10, later - 5])) == "ok"


def test_snapshot_and_restore_round_trip_with_and_without_claims():
    kv, _ = applied(command(SET, "b", b"2"), command(SET, "a", b"\x00\xff"), command(SET, "\u00e9", b"3"))
    plain = kv.snapshot()
    assert cbor2.loads(plain) == values(kv)  # without claims: the map alone, as nodes from before claims wrote it
    copy = KeyValueStore()
    copy.restore(plain)
    assert values(copy) == values(kv) and list(copy.keys) == sorted(values(kv)) and copy.admin_claims.claims == {}
    kv.apply(4, command(ADMIN_CLAIM, "sig", b"", [5.0, 5.0]))
    with_claims = kv.snapshot()
    horizon = max(0.0, 5.0 - CLAIM_RETENTION_SECONDS)  # 5 s after the epoch: nothing to forget yet
    assert cbor2.loads(with_claims) == [SNAPSHOT_WITH_CLAIMS_V2, values(kv), {"sig": 5.0}, horizon]
    copy.restore(with_claims)
    assert values(copy) == values(kv) and copy.admin_claims.claims == {"sig": 5.0} and copy.admin_claims.horizon == horizon
    assert copy.apply(5, command(ADMIN_CLAIM, "sig", b"", [5.0, 6.0])) == "used"  # the claim came along
    assert copy.snapshot() == kv.snapshot()
    # The previous version's format is still read, with a horizon of 0.
    copy.restore(cbor2.dumps([SNAPSHOT_WITH_CLAIMS, values(kv), {"old": 3.0}]))
    assert copy.admin_claims.claims == {"old": 3.0} and copy.admin_claims.horizon == 0.0
    copy.restore(b"")  # the empty state
    assert values(copy) == {} and list(copy.keys) == [] and copy.admin_claims.claims == {}


@pytest.mark.parametrize("snapshot", [cbor2.dumps(["another-format", {}, {}]), cbor2.dumps([SNAPSHOT_WITH_CLAIMS, {}]),
                                      cbor2.dumps(7), cbor2.dumps([SNAPSHOT_WITH_CLAIMS, [], {}]),
                                      cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {}, {}, "x"]),
                                      cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {}, [], 0.0])])
def test_a_snapshot_of_an_unknown_format_is_refused_and_changes_nothing(snapshot):
    kv, _ = applied(command(SET, "a", b"1"))
    with pytest.raises(ValueError, match="unknown format"):
        kv.restore(snapshot)
    assert values(kv) == {"a": b"1"} and list(kv.keys) == ["a"]


def test_pages_follow_prefix_after_and_limit():
    kv, _ = applied(*(command(SET, k, b"") for k in ("a", "b/1", "b/2", "b/3", "ba", "c", "\u00e9")))
    assert kv.page("", "", 3) == (["a", "b/1", "b/2"], True)
    assert kv.page("b/", "", 2) == (["b/1", "b/2"], True)
    assert kv.page("b/", "b/2", 2) == (["b/3"], False)
    assert kv.page("b/", "a", 10) == (["b/1", "b/2", "b/3"], False)  # `after` before the prefix: from the prefix
    assert kv.page("b", "b/3", 10) == (["ba"], False)
    assert kv.page("", "c", 10) == (["\u00e9"], False)
    assert kv.page("zz", "", 10) == ([], False)
    assert kv.page("", "", 7) == (sorted(values(kv)), False)


KEYS = st.text(alphabet="ab/\u00e9", min_size=1, max_size=4)
VALUES = st.binary(max_size=3)
OPS = st.one_of(
    st.tuples(st.just(SET), KEYS, VALUES, st.none()),
    st.tuples(st.just(DELETE), KEYS, st.just(b""), st.none()),
    st.tuples(st.just(COMPARE_AND_SET), KEYS, VALUES, VALUES),
    st.tuples(st.just(CREATE), KEYS, VALUES, st.none()),
    st.tuples(st.just("snapshot"), st.just(""), st.just(b""), st.none()),
    # A signed admin request's claim: [timestamp, leader's clock], clocks within the allowed skew of each other.
    st.integers(0, 3000).flatmap(lambda now: st.tuples(
        st.just(ADMIN_CLAIM), st.sampled_from(["s1", "s2", "s3", "s4"]), st.just(b""),
        st.tuples(st.integers(now - 300, now + 300), st.just(now)).map(lambda t: [float(t[0]), float(t[1])]))),
)


def model_apply(model: dict, op, key, value, expected) -> str:
    if op == DELETE:
        return "ok" if model.pop(key, None) is not None else "missing"
    if (op == COMPARE_AND_SET and model.get(key) != expected) or (op == CREATE and key in model):
        return "failed"
    model[key] = value
    return "ok"


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=60), KEYS, st.text(alphabet="ab/\u00e9", max_size=3), st.integers(1, 5))
def test_a_random_history_matches_a_dict_through_snapshots(ops, prefix, after, limit):
    """The keys against a dict; and the whole state (admin claims too) against a replica that applied every
    command and never restored: a node that installed a snapshot must give the same results and the same
    snapshot bytes from then on (the claims' horizon once was not in the snapshot, and such nodes diverged)."""
    kv, model, replica = KeyValueStore(), {}, KeyValueStore()
    for index, (op, key, value, expected) in enumerate(ops, 1):
        if op == "snapshot":  # a node that restarts from a snapshot, or installs one, carries on the same
            restored = KeyValueStore()
            restored.restore(kv.snapshot())
            kv = restored
            continue
        result = kv.apply(index, command(op, key, value, expected))
        assert result == replica.apply(index, command(op, key, value, expected))
        if op != ADMIN_CLAIM:
            assert result == model_apply(model, op, key, value, expected)
        assert values(kv) == model
    assert kv.snapshot() == replica.snapshot()
    assert list(kv.keys) == sorted(model)
    want = sorted(k for k in model if k.startswith(prefix) and k > after)
    assert kv.page(prefix, after, limit) == (want[:limit], len(want) > limit)


def test_the_same_commands_give_the_same_snapshot_bytes():
    commands = [command(SET, f"k{i % 7}", b"%d" % i) for i in range(50)] + [command(DELETE, "k3")]
    first, _ = applied(*commands)
    second, _ = applied(*commands)
    assert first.snapshot() == second.snapshot()


# The store's imports: the standard library's pure modules, cbor2 and sortedcontainers; admin.py's, the store and
# the standard library (it reads the clock and a file, but loads nothing of the server's runtime).
ALLOWED_IMPORTS = {
    "store": {"__future__", "logging", "cbor2", "sortedcontainers", "typing", "collections.abc"},
    "admin": {"__future__", "collections", "hashlib", "hmac", "json", "os", "re", "time", "collections.abc", "store"},
}


@pytest.mark.parametrize("module", sorted(ALLOWED_IMPORTS))
def test_the_store_and_admin_modules_import_nothing_of_the_runtime(module):
    with open(os.path.join(ROOT, "raftlib", "server", module + ".py")) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module if node.level == 0 else (node.module or ""))
    assert imported <= ALLOWED_IMPORTS[module], imported - ALLOWED_IMPORTS[module]
    code = (f"import sys; import raftlib.server.{module}; "
            "print(sorted(m for m in ('gevent', 'zmq', 'bottle', 'socket', 'raftdzmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert store.__doc__ and "Pure" in store.__doc__
