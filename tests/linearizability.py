"""A linearizability checker for histories of reads and writes on keys (registers).

The search is Wing & Gong's, with the memoization Lowe added and Porcupine uses: walk the history's call and return
events in time order; at a call, try to linearize that operation now (if the register allows it) and move on; at a
return of an operation not yet linearized, undo the last choice and try the next. A cache of (operations linearized
so far, register value) cuts every branch that was already explored. Keys are independent registers, so each key is
checked on its own (P-compositionality), which keeps every search small.

An operation whose outcome is unknown (a write that timed out, or whose connection broke) may take effect at any
moment after it was invoked, or never: it has a call event and no return event. A read with no answer has no effect
and is left out of the history by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

READ, WRITE = "read", "write"


@dataclasses.dataclass
class Op:
    """One client operation. `value` is what was written, or what the read returned (None: the key did not
    exist). `ret` is math.inf when the outcome is unknown (writes only)."""

    key: str
    kind: str
    value: object
    call: float
    ret: float = math.inf
    client: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (READ, WRITE):
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.kind == READ and self.ret == math.inf:
            raise ValueError("a read with no answer has no effect: leave it out of the history")
        if self.ret < self.call:
            raise ValueError(f"operation returned before it was called: {self}")


@dataclasses.dataclass
class Result:
    ok: bool
    key: str | None = None
    explanation: str = ""


class _Event:
    __slots__ = ("op_id", "is_call", "prev", "next", "match")

    def __init__(self, op_id: int, is_call: bool) -> None:
        self.op_id = op_id
        self.is_call = is_call
        self.prev = self.next = self.match = None


def _register_step(state, op: Op):
    if op.kind == WRITE:
        return True, op.value
    return op.value == state, state


def _settle_unknown_writes(ops: list[Op]) -> list[Op]:
    """Give each unknown-outcome write the latest moment it could have taken effect, or drop it.

    With unique written values this loses nothing and saves the search from trying every unknown write at every
    later point. A write nobody read can be left out: any order that places it stays legal without it (no read
    returns its value). A write somebody read took effect before the earliest return among those reads, so that
    return becomes its own. (When values repeat this is not sound, and they are left alone.)"""
    written = [op.value for op in ops if op.kind == WRITE]
    if len(written) != len(set(written)):
        return ops
    first_seen: dict[object, float] = {}
    for op in ops:
        if op.kind == READ:
            first_seen[op.value] = min(first_seen.get(op.value, math.inf), op.ret)
    out = []
    for op in ops:
        if op.kind == WRITE and op.ret == math.inf:
            seen = first_seen.get(op.value, math.inf)
            if seen == math.inf:
                continue
            op = dataclasses.replace(op, ret=max(seen, op.call))
        out.append(op)
    return out


def check_register(ops: list[Op], initial=None) -> Result:
    """Is this history of one register linearizable? `initial` is the value before the first operation."""
    ops = _settle_unknown_writes(ops)
    if not ops:
        return Result(True)
    events = []
    for i, op in enumerate(ops):
        call = _Event(i, True)
        events.append((op.call, 0, call))
        if op.ret != math.inf:
            ret = _Event(i, False)
            call.match = ret
            events.append((op.ret, 1, ret))
    # At equal times a call sorts before a return: the two operations then count as concurrent, the lenient choice
    # for clock readings that cannot order them.
    events.sort(key=lambda e: (e[0], e[1]))
    head = _Event(-1, True)
    prev = head
    for _, _, ev in events:
        prev.next, ev.prev = ev, prev
        prev = ev

    def lift(call: _Event) -> None:
        call.prev.next = call.next
        if call.next is not None:
            call.next.prev = call.prev
        ret = call.match
        if ret is not None:
            ret.prev.next = ret.next
            if ret.next is not None:
                ret.next.prev = ret.prev

    def unlift(call: _Event) -> None:
        ret = call.match
        if ret is not None:
            ret.prev.next = ret
            if ret.next is not None:
                ret.next.prev = ret
        call.prev.next = call
        if call.next is not None:
            call.next.prev = call

    remaining = sum(1 for op in ops if op.ret != math.inf)  # operations that must be linearized
    state = initial
    linearized = 0
    cache: set[tuple[int, object]] = set()
    stack: list[tuple[_Event, object]] = []
    best_depth, best_stuck = -1, None
    entry = head.next
    while remaining:
        if entry.is_call:
            op = ops[entry.op_id]
            ok, new_state = _register_step(state, op)
            if ok:
                key = (linearized | (1 << entry.op_id), new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state, linearized = new_state, key[0]
                    lift(entry)
                    if entry.match is not None:
                        remaining -= 1
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if len(stack) > best_depth:
                best_depth, best_stuck = len(stack), (entry.op_id, state)
            if not stack:
                return Result(False, ops[0].key, _explain(ops, best_stuck))
            entry, state = stack.pop()
            linearized &= ~(1 << entry.op_id)
            unlift(entry)
            if entry.match is not None:
                remaining += 1
            entry = entry.next
    return Result(True, ops[0].key)


def _explain(ops: list[Op], stuck) -> str:
    op_id, state = stuck
    op = ops[op_id]
    what = f"read returned {op.value!r}" if op.kind == READ else f"write of {op.value!r}"
    return (f"key {op.key!r}: {what} (client {op.client}, called at {op.call:.6f}, returned at {op.ret:.6f}) cannot "
            f"be placed in any order consistent with real time; at best the register held {state!r} then")


def check(ops: list[Op]) -> Result:
    """Check a history over many keys, each key a register starting out missing (None)."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    for key in sorted(by_key):
        result = check_register(by_key[key])
        if not result.ok:
            return result
    return Result(True)
