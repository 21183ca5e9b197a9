"""What one entry of the feature level 2 costs the event loop in raftlib.server.store (review of coord1, L1-L3):
a capped prefix delete, a txn of MAX_TXN_OPS prefix gets, the raise over N keys, and a snapshot in both formats.
Run: python bench/store_apply.py [N keys, default 300000]. Measures; asserts nothing."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftlib.server.store import (  # noqa: E402
    DELETE_PREFIX, FEATURE_LEVEL, MAX_DELETE_KEYS_PER_ENTRY, MAX_TXN_OPS, SET, SET_FEATURE_LEVEL, TXN, KeyValueStore,
    command)


def timed(what: str, f) -> object:
    t0 = time.perf_counter()
    result = f()
    print(f"{what}: {(time.perf_counter() - t0) * 1000:.1f} ms")
    return result


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    value = b"x" * 100
    kv = KeyValueStore(on_event=lambda e: None)  # a watcher's seam costs its list appends too
    for i in range(n):
        kv.apply(i + 1, command(SET, f"k/{i:08d}", value))
    timed(f"old-format snapshot of {n} keys (level 1)", kv.snapshot)
    timed(f"the raise over {n} keys", lambda: kv.apply(n + 1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL)))
    data = timed(f"V3 snapshot of {n} keys", kv.snapshot)
    timed(f"V3 restore of {n} keys", lambda: KeyValueStore().restore(data))
    get_all = command(TXN, "", b"", [[], [["get", "k", True]] * MAX_TXN_OPS, []])
    timed(f"a txn of {MAX_TXN_OPS} prefix gets over {n} keys (capped)", lambda: kv.apply(n + 2, get_all))
    deleted = timed(f"a prefix delete over {n} keys (capped at {MAX_DELETE_KEYS_PER_ENTRY})",
                    lambda: kv.apply(n + 3, command(DELETE_PREFIX, "k/")))
    print(f"  deleted {deleted}")


if __name__ == "__main__":
    main()
