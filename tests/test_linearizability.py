"""The linearizability checker itself: histories that must pass, histories that must fail, and agreement with a
brute-force search over every order on small random histories."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from linearizability import READ, WRITE, Op, check, check_register


def w(value, call, ret=math.inf, key="k"):
    return Op(key, WRITE, value, call, ret)


def r(value, call, ret, key="k"):
    return Op(key, READ, value, call, ret)


def test_sequential_history_passes():
    assert check_register([r(None, 0, 1), w("a", 2, 3), r("a", 4, 5), w("b", 6, 7), r("b", 8, 9)]).ok


def test_concurrent_write_may_be_seen_or_not():
    # The write overlaps both reads: old-then-new is fine.
    assert check_register([w("a", 0, 1), w("b", 2, 10), r("a", 3, 4), r("b", 5, 6)]).ok


def test_stale_read_fails():
    result = check_register([w("a", 0, 1), w("b", 2, 3), r("a", 4, 5)])
    assert not result.ok
    assert "'a'" in result.explanation


def test_lost_write_fails():
    # An acknowledged write that a later read does not see (the key reads as missing).
    assert not check_register([w("a", 0, 1), r(None, 2, 3)]).ok


def test_new_then_old_read_fails():
    # The write is concurrent with both reads, but once one read saw the new value a later read may not go back.
    assert not check_register([w("a", 0, 1), w("b", 2, 20), r("b", 3, 4), r("a", 5, 6)]).ok


def test_read_of_a_value_never_written_fails():
    assert not check_register([w("a", 0, 1), r("zzz", 2, 3)]).ok


def test_unknown_write_may_take_effect_late_or_never():
    # Invoked at 2, never answered: it may appear at any later time...
    assert check_register([w("a", 0, 1), w("b", 2), r("a", 3, 4), r("b", 10, 11), r("b", 12, 13)]).ok
    # ...or never.
    assert check_register([w("a", 0, 1), w("b", 2), r("a", 3, 4), r("a", 10, 11)]).ok
    # But not before it was invoked.
    assert not check_register([w("a", 0, 1), r("b", 2, 3), w("b", 4)]).ok
    # And once seen, it cannot be unseen.
    assert not check_register([w("a", 0, 1), w("b", 2), r("b", 3, 4), r("a", 5, 6)]).ok


def test_keys_are_independent_registers():
    assert check([w("a", 0, 1, key="x"), w("b", 0, 1, key="y"), r("a", 2, 3, key="x"), r("b", 2, 3, key="y")]).ok
    result = check([w("a", 0, 1, key="x"), r("a", 2, 3, key="y")])
    assert not result.ok and result.key == "y"


def test_long_history_is_checked_quickly():
    # 5 clients x 2,000 operations with overlaps, in well under the CI budget.
    ops, t, value = [], 0.0, None
    for i in range(2000):
        for c in range(5):
            if (i + c) % 3 == 0:
                value = f"v{i}.{c}"
                ops.append(Op("k", WRITE, value, t + c * 0.1, t + 0.55, c))
            else:
                ops.append(Op("k", READ, None, t + c * 0.1, t + 0.55, c))
        # every read in the round may see any write of the round: give them the round's last written value
        for op in ops[-5:]:
            if op.kind == READ:
                op.value = value
        t += 1
    ops.insert(0, Op("k", WRITE, None, -2, -1))
    assert check(ops).ok


def brute_force(ops: list[Op]) -> bool:
    """Try every subset of the unknown writes and every order: the definition itself, for small histories."""
    known = [op for op in ops if op.ret != math.inf]
    unknown = [op for op in ops if op.ret == math.inf]
    for n in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, n):
            for order in itertools.permutations(known + list(chosen)):
                if _respects_real_time(order) and _legal(order):
                    return True
    return False


def _respects_real_time(order) -> bool:
    return all(not (b.ret < a.call) for i, a in enumerate(order) for b in order[i + 1:])


def _legal(order) -> bool:
    state = None
    for op in order:
        if op.kind == WRITE:
            state = op.value
        elif op.value != state:
            return False
    return True


@st.composite
def small_histories(draw):
    n = draw(st.integers(1, 6))
    ops = []
    for i in range(n):
        call = draw(st.integers(0, 12))
        length = draw(st.integers(0, 6))
        if draw(st.booleans()):
            ret = math.inf if draw(st.integers(0, 4)) == 0 else call + length
            ops.append(Op("k", WRITE, f"v{i}", call, ret))
        else:
            value = draw(st.sampled_from([None] + [f"v{j}" for j in range(n)]))
            ops.append(Op("k", READ, value, call, call + length))
    return ops


@settings(max_examples=600, deadline=None)
@given(small_histories())
def test_agrees_with_brute_force(ops):
    assert check_register(ops).ok == brute_force(ops), ops
