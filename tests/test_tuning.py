"""raftlib.server.tuning's collector policy: a full collection's survivors frozen, frozen garbage bounded by a sweep.

Each test runs the collector of the test process itself: it installs the policy, collects, and uninstalls and
unfreezes everything before it returns (what was frozen is then walked again, as before the test)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from raftlib.messages import Entry
from raftlib.server.tuning import FreezeSurvivors


class Cell:
    """A tracked object that can be half of a cycle and be watched by a weak reference."""

    __slots__ = ("other", "__weakref__")

    def __init__(self) -> None:
        self.other: Cell | None = None


def a_cycle() -> Cell:
    a, b = Cell(), Cell()
    a.other, b.other = b, a
    return a


@pytest.fixture
def policy() -> Iterator[FreezeSurvivors]:
    gc.collect()
    gc.freeze()  # as raftdzmq.py does before it installs the policy: start-up's objects out of sight
    survivors = FreezeSurvivors()
    survivors.install()
    try:
        yield survivors
    finally:
        survivors.uninstall()
        gc.unfreeze()


def test_a_full_collection_freezes_its_survivors_so_the_next_walks_only_what_came_since(
        policy: FreezeSurvivors) -> None:
    log = [Entry(term=1, index=i, data=b"x" * 100) for i in range(1, 5001)]
    gc.collect()
    appended = [Entry(term=1, index=i) for i in range(5001, 5011)]
    walked_next = {id(o) for o in gc.get_objects(2)} | {id(o) for o in gc.get_objects(1)} | \
        {id(o) for o in gc.get_objects(0)}
    assert not any(id(e) in walked_next for e in log), "the survivors of the full collection are still walked"
    assert all(id(e) in walked_next for e in appended)
    log_ids = {id(e) for e in log}
    gc.collect()  # the appended entries survive this one: frozen too
    assert not any(id(e) in log_ids or id(e) in {id(a) for a in appended} for e in gc.get_objects(2))
    assert policy.sweeps == 0


def test_garbage_frozen_alive_is_freed_by_a_sweep_before_it_passes_the_bound(policy: FreezeSurvivors) -> None:
    policy.SWEEP_SLACK = 2000  # a smaller bound, for a shorter test
    round_cells = 1000
    watched: list[weakref.ref[Cell]] = []
    for _ in range(1000):  # rounds: bounded; a sweep is due after ~frozen_after_sweep / round_cells of them
        cycles = [a_cycle() for _ in range(round_cells // 2)]
        watched += [weakref.ref(c) for c in cycles]
        gc.collect()  # the cycles are alive: frozen (or, once the bound is passed, everything unfrozen)
        del cycles  # garbage now, in a cycle each: only a collection that walks them frees them
        frozen_garbage = 2 * sum(r() is not None for r in watched)
        assert frozen_garbage <= policy.SWEEP_GROWTH * policy.frozen_after_sweep + policy.SWEEP_SLACK + round_cells, \
            "frozen garbage passed the bound"
        if policy.sweeps:
            break
    assert policy.sweeps == 1
    assert sum(r() is not None for r in watched) <= round_cells // 2, "the sweep left the earlier rounds' garbage"
