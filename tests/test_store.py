"""raftlib.server.store in process: every command and its result, snapshots and their formats, pages of keys, a
random history against a dict (hypothesis), and the module's purity (no gevent, Bottle, zmq or clock)."""

from __future__ import annotations

import ast
import os
import random
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
    PIECE_BYTES,
    PIECE_KEYS,
    SET,
    CLAIM_RETENTION_SECONDS,
    SNAPSHOT_PIECES,
    SNAPSHOT_WITH_CLAIMS,
    SNAPSHOT_WITH_CLAIMS_V2,
    KeyValueStore,
    command,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def applied(*commands: bytes) -> tuple[KeyValueStore, list[str]]:
    kv = KeyValueStore()
    return kv, [kv.apply(i + 1, c) for i, c in enumerate(commands)]


def test_set_creates_and_overwrites():
    kv, results = applied(command(SET, "a", b"1"), command(SET, "a", b"2"), command(SET, "b", b""))
    assert results == ["ok", "ok", "ok"]
    assert kv.data == {"a": b"2", "b": b""} and list(kv.keys) == ["a", "b"] and len(kv) == 2
    assert kv.get("a") == b"2" and kv.get("b") == b"" and kv.get("c") is None


def test_delete_answers_missing_for_a_key_that_is_not_there():
    kv, results = applied(command(SET, "a", b"1"), command(DELETE, "a"), command(DELETE, "a"), command(DELETE, "z"))
    assert results == ["ok", "ok", "missing", "missing"]
    assert kv.data == {} and list(kv.keys) == []


def test_compare_and_set_sets_only_on_the_expected_value():
    kv, results = applied(command(SET, "a", b"1"), command(COMPARE_AND_SET, "a", b"3", b"2"),
                          command(COMPARE_AND_SET, "a", b"3", b"1"), command(COMPARE_AND_SET, "new", b"x", b""))
    assert results == ["ok", "failed", "ok", "failed"]
    assert kv.data == {"a": b"3"}
    # An expected value of None matches a missing key (HTTP always sends bytes: prev_value= is b"").
    assert kv.apply(5, command(COMPARE_AND_SET, "fresh", b"x", None)) == "ok" and kv.get("fresh") == b"x"
    assert list(kv.keys) == ["a", "fresh"]


def test_create_only_when_the_key_is_missing():
    kv, results = applied(command(CREATE, "a", b"1"), command(CREATE, "a", b"2"))
    assert results == ["ok", "failed"] and kv.data == {"a": b"1"}


def test_an_unknown_op_applies_as_nothing_and_junk_as_an_error():
    kv, results = applied(command(SET, "a", b"1"), command(99, "a", b"2"), b"\xff\x00junk", cbor2.dumps([SET, "a"]))
    assert results == ["ok", "ok", "error", "error"]
    assert kv.data == {"a": b"1"}


def test_admin_claims_take_a_signature_once_and_forget_it_after_the_window():
    now = 1_700_000_000.0
    kv, results = applied(command(ADMIN_CLAIM, "sig1", b"", [now, now]), command(ADMIN_CLAIM, "sig1", b"", [now, now]),
                          command(ADMIN_CLAIM, "sig2", b"", [now, now + 1]))
    assert results == ["ok", "used", "ok"]
    assert kv.data == {} and kv.admin_claims.claims == {"sig1": now, "sig2": now}
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


def _header(snapshot: bytes) -> object:
    """The first item of a snapshot of pieces: its header."""
    assert snapshot[0] == 0x5A
    return cbor2.loads(snapshot[5 : 5 + int.from_bytes(snapshot[1:5], "big")])


def test_snapshots_of_the_formats_from_before_pieces_still_restore():
    """A data dir from before pieces must start: the plain map, and the map with claims (v1, and v2 with its
    horizon), restore (in one step)."""
    data = {"b": b"2", "a": b"\x00\xff", "\u00e9": b"3"}
    copy = KeyValueStore()
    copy.restore(cbor2.dumps(data))
    assert copy.data == data and list(copy.keys) == sorted(data) and copy.admin_claims.claims == {}
    copy.restore(cbor2.dumps([SNAPSHOT_WITH_CLAIMS, data, {"sig": 5.0}]))
    assert copy.data == data and copy.admin_claims.claims == {"sig": 5.0}
    assert copy.apply(5, command(ADMIN_CLAIM, "sig", b"", [5.0, 6.0])) == "used"  # the claim came along
    copy.restore(cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, data, {"sig": 2000.0}, 1100.0]))  # main's, with a horizon
    assert copy.data == data and copy.admin_claims.claims == {"sig": 2000.0} and copy.admin_claims.horizon == 1100.0
    assert copy.apply(6, command(ADMIN_CLAIM, "other", b"", [1000.0, 1500.0])) == "expired"
    copy.keys._check()


def test_snapshot_and_restore_round_trip_with_and_without_claims():
    kv, _ = applied(command(SET, "b", b"2"), command(SET, "a", b"\x00\xff"), command(SET, "\u00e9", b"3"))
    plain = kv.snapshot()
    copy = KeyValueStore()
    copy.restore(plain)
    assert copy.data == kv.data and list(copy.keys) == sorted(kv.data) and copy.admin_claims.claims == {}
    kv.apply(4, command(ADMIN_CLAIM, "sig", b"", [1500.0, 1500.0]))
    kv.apply(5, command(ADMIN_CLAIM, "late", b"", [2000.0, 2000.0]))  # a horizon past 0: it must come along
    horizon = 2000.0 - CLAIM_RETENTION_SECONDS
    assert kv.admin_claims.horizon == horizon and kv.admin_claims.claims == {"sig": 1500.0, "late": 2000.0}
    with_claims = kv.snapshot()
    assert _header(with_claims) == [SNAPSHOT_PIECES, {"sig": 1500.0, "late": 2000.0}, horizon, len(kv.data)]
    copy.restore(with_claims)
    assert copy.data == kv.data and copy.admin_claims.claims == {"sig": 1500.0, "late": 2000.0}
    assert copy.admin_claims.horizon == horizon
    assert copy.snapshot() == kv.snapshot()
    assert copy.apply(6, command(ADMIN_CLAIM, "sig", b"", [1500.0, 2001.0])) == "used"  # the claim came along
    assert copy.apply(7, command(ADMIN_CLAIM, "new", b"", [horizon - 1, 2001.0])) == "expired"  # and the horizon
    # The previous version's format is still read, with a horizon of 0.
    copy.restore(cbor2.dumps([SNAPSHOT_WITH_CLAIMS, kv.data, {"old": 3.0}]))
    assert copy.admin_claims.claims == {"old": 3.0} and copy.admin_claims.horizon == 0.0
    copy.restore(b"")  # the empty state
    assert copy.data == {} and list(copy.keys) == [] and copy.admin_claims.claims == {}


def big_store(n: int, seed: int = 1) -> KeyValueStore:
    rng = random.Random(seed)
    kv = KeyValueStore()
    for i in range(n):
        kv.apply(i + 1, command(SET, f"k{rng.random()}", bytes(rng.randrange(0, 300))))
    return kv


def test_a_snapshot_restores_a_piece_per_step_and_replaces_the_state_only_at_its_end():
    """Issue 13: a follower restores a big snapshot a piece per turn of its loop. Each step decodes at most
    PIECE_KEYS keys; until the last, the old state is in place whole (reads see it), and the new one, once in,
    is the snapshot's exactly, its sorted keys a valid SortedList built without a sort."""
    kv = big_store(3 * PIECE_KEYS + 17)
    old, _ = applied(command(SET, "old", b"1"))
    steps = old.restoring(kv.snapshot())
    n = 0
    while not next(steps):
        n += 1
        assert old.data == {"old": b"1"} and list(old.keys) == ["old"]
    assert n >= 4  # at least 3 full pieces and a partial one
    assert old.data == kv.data and list(old.keys) == sorted(kv.data)
    assert not any(steps)  # the old state freed in steps that replace nothing more
    old.keys._check()
    for k in list(kv.data)[:50]:  # the SortedList built by layout works as one built by adds
        old.apply(0, command(DELETE, k))
        old.apply(0, command(SET, k + "x", b""))
    old.keys._check()
    assert list(old.keys) == sorted(old.data)


def test_pieces_are_bounded_by_keys_and_by_bytes():
    kv = big_store(2 * PIECE_KEYS)
    kv.apply(0, command(SET, "big", bytes(3 * PIECE_BYTES)))
    snapshot = kv.snapshot()
    offset, sizes = 0, []
    while offset < len(snapshot):
        assert snapshot[offset] == 0x5A
        length = int.from_bytes(snapshot[offset + 1 : offset + 5], "big")
        item = cbor2.loads(snapshot[offset + 5 : offset + 5 + length])
        sizes.append((len(item) // 2, sum(len(x) for x in item)) if offset else None)
        offset += 5 + length
    for keys, size in sizes[1:]:
        assert keys <= PIECE_KEYS
        assert keys == 1 or size < PIECE_BYTES + 300 + 40  # cut once past PIECE_BYTES: one key's worth over at most


def test_a_restore_dropped_part_way_changes_nothing():
    kv = big_store(2 * PIECE_KEYS)
    old, _ = applied(command(SET, "old", b"1"))
    steps = old.restoring(kv.snapshot())
    assert not next(steps) and not next(steps)
    steps.close()
    assert old.data == {"old": b"1"} and list(old.keys) == ["old"]


def damaged_snapshots() -> list[tuple[str, bytes]]:
    from raftlib.server.store import _framed

    kv = big_store(PIECE_KEYS + 5)
    good = kv.snapshot()
    header = _framed(cbor2.dumps([SNAPSHOT_PIECES, {}, 0.0, 2]))
    return [
        ("cut short", good[:-10]),
        ("keys out of order", header + _framed(cbor2.dumps(["b", b"", "a", b""]))),
        ("a key twice", header + _framed(cbor2.dumps(["a", b"", "a", b""]))),
        ("pieces out of order", header + _framed(cbor2.dumps(["b", b""])) + _framed(cbor2.dumps(["a", b""]))),
        ("a count that differs", header + _framed(cbor2.dumps(["a", b""]))),
        ("a value not bytes", header + _framed(cbor2.dumps(["a", b"", "b", 7]))),
        ("a piece that does not decode", header + _framed(b"\xff\xff")),
        ("a newer header", _framed(cbor2.dumps(["raftdzmq-kv-pieces-v9", {}, 0.0, 0]))),
        ("a header without its horizon", _framed(cbor2.dumps([SNAPSHOT_PIECES, {}, 0]))),
        ("a horizon not a number", _framed(cbor2.dumps([SNAPSHOT_PIECES, {}, "x", 0]))),
        # Second review of snapfork, finding 4: claims and horizon checked before anything is replaced.
        *[(f"claims {name}", _framed(cbor2.dumps([SNAPSHOT_PIECES, claims, horizon, 1]))
           + _framed(cbor2.dumps(["b", b"2"])))
          for name, claims, horizon in (
              ("with a timestamp not a number", {"sig": "x"}, 0.0),
              ("with a timestamp true", {"sig": True}, 0.0),
              ("keyed by a number", {7: 1.0}, 0.0),
              ("with an infinite timestamp", {"sig": float("inf")}, 0.0),
              ("and an infinite horizon", {}, float("inf")),
              ("and a horizon not a number (NaN)", {}, float("nan")),
              ("and a horizon past float's range", {}, 10**400),
              ("with a timestamp past float's range", {"sig": 10**400}, 0.0),
          )],
        ("old format, claims with a timestamp not a number",
         cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {"b": b"2"}, {"sig": "x"}, 0.0])),
        ("old format, a horizon past float's range", cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {"b": b"2"}, {}, 10**400])),
        ("oldest format, claims keyed by a number", cbor2.dumps([SNAPSHOT_WITH_CLAIMS, {"b": b"2"}, {7: 1.0}])),
    ]


@pytest.mark.parametrize("name, snapshot", damaged_snapshots(), ids=[n for n, _ in damaged_snapshots()])
def test_a_damaged_snapshot_of_pieces_is_refused_and_changes_nothing(name, snapshot):
    kv, _ = applied(command(SET, "a", b"1"))
    claims = kv.admin_claims
    with pytest.raises(ValueError):
        kv.restore(snapshot)
    assert kv.data == {"a": b"1"} and list(kv.keys) == ["a"] and kv.admin_claims is claims


@pytest.mark.parametrize("snapshot", [cbor2.dumps(["another-format", {}, {}]), cbor2.dumps([SNAPSHOT_WITH_CLAIMS, {}]),
                                      cbor2.dumps(7), cbor2.dumps([SNAPSHOT_WITH_CLAIMS, [], {}]),
                                      cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {}, {}, "x"]),
                                      cbor2.dumps([SNAPSHOT_WITH_CLAIMS_V2, {}, [], 0.0])])
def test_a_snapshot_of_an_unknown_format_is_refused_and_changes_nothing(snapshot):
    kv, _ = applied(command(SET, "a", b"1"))
    with pytest.raises(ValueError, match="unknown format"):
        kv.restore(snapshot)
    assert kv.data == {"a": b"1"} and list(kv.keys) == ["a"]


def test_pages_follow_prefix_after_and_limit():
    kv, _ = applied(*(command(SET, k, b"") for k in ("a", "b/1", "b/2", "b/3", "ba", "c", "\u00e9")))
    assert kv.page("", "", 3) == (["a", "b/1", "b/2"], True)
    assert kv.page("b/", "", 2) == (["b/1", "b/2"], True)
    assert kv.page("b/", "b/2", 2) == (["b/3"], False)
    assert kv.page("b/", "a", 10) == (["b/1", "b/2", "b/3"], False)  # `after` before the prefix: from the prefix
    assert kv.page("b", "b/3", 10) == (["ba"], False)
    assert kv.page("", "c", 10) == (["\u00e9"], False)
    assert kv.page("zz", "", 10) == ([], False)
    assert kv.page("", "", 7) == (sorted(kv.data), False)


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
        assert kv.data == model
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
    "store": {"__future__", "logging", "struct", "collections.abc", "cbor2", "sortedcontainers"},
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


def test_the_old_state_is_freed_a_piece_per_step_after_the_new_one_is_in():
    """Freeing a million keys at once holds the loop as long as decoding them: after the swap, the old state is
    freed over the following steps, each dropping a bounded number of keys."""
    old = big_store(10 * PIECE_KEYS)
    held = old.data
    steps = old.restoring(big_store(10, seed=2).snapshot())
    while not next(steps):
        pass
    assert len(old.data) == 10 and len(held) == 10 * PIECE_KEYS
    sizes = []
    for _ in steps:
        sizes.append(len(held))
    assert len(held) == 0 and len(sizes) >= 3
    assert all(a - b <= 4 * PIECE_KEYS for a, b in zip([10 * PIECE_KEYS] + sizes, sizes))
