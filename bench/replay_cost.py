#!/usr/bin/env python
"""A restart's two costs per MB (issue 13, -snapshot-log-ratio): restoring the snapshot, and replaying the log since
it (DiskStorage.load reading and decoding it, then KeyValueStore.apply of every entry), in this process. A restart
costs restore(S) + replay(L) for a snapshot of S bytes and L bytes of log; a snapshot is due once L reaches
max(-snapshot-threshold, R x S), so at worst a restart takes restore(S) x (1 + R x replay_per_mb / restore_per_mb).
The ratio R that keeps it within --within x a restore alone is printed.

    python bench/replay_cost.py --keys 1000000 --log-keys 250000 --rounds 3

Set-up (not timed): a level-3 snapshot of --keys keys (`k000000000`.., bench/restart.py's state_bytes), restored
into a store; a DiskStorage in a temporary folder holding --log-keys new keys in entries of --batch puts (as
bench/scale.py --batch loads), saved --save-entries a record. Timed, --rounds times, alternating: `restore`
(KeyValueStore.restore of the snapshot's bytes into a fresh store) and `replay` (a DiskStorage opened on the folder
and loaded, its entries applied to a store holding the snapshot). CPU seconds (time.process_time) and wall
seconds; medians. Measures; asserts nothing. Note `uptime` next to the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.restart import state_bytes  # noqa: E402
from raftlib.messages import Entry, EntryKind, HardState  # noqa: E402
from raftlib.server.store import TXN, KeyValueStore, command  # noqa: E402
from raftlib.storage import DiskStorage  # noqa: E402


def write_log(data_dir: str, first_key: int, keys: int, batch: int, value_bytes: int, save_entries: int) -> int:
    """A data dir holding `keys` new keys in TXN entries of `batch` puts from index 1: its log bytes."""
    value = "v" * value_bytes
    storage = DiskStorage(data_dir)
    storage.load()
    entries = [
        Entry(1, n + 1, EntryKind.COMMAND, command(TXN, "", b"", [[], [["put", f"k{k:09d}", value.encode()]
                                                                       for k in range(start, min(start + batch,
                                                                                                 first_key + keys))],
                                                                  []]))
        for n, start in enumerate(range(first_key, first_key + keys, batch))]
    for i in range(0, len(entries), save_entries):
        piece = entries[i : i + save_entries]
        storage.save(HardState(1, None, piece[-1].index), piece)
    log_bytes = storage.log_bytes
    storage.close()
    return log_bytes


def timed(f) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of f()."""
    cpu, wall = time.process_time(), time.perf_counter()
    f()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys in the snapshot")
    p.add_argument("--log-keys", type=int, default=250_000, help="new keys in the log after it")
    p.add_argument("--batch", type=int, default=100, help="puts an entry (a transaction)")
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--save-entries", type=int, default=16, help="entries a saved record (a group commit)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--within", type=float, default=1.5, help="a restart's bound, in restores alone")
    args = p.parse_args()
    snapshot = state_bytes(args.keys, args.value_bytes, "v4")
    workdir = tempfile.mkdtemp(prefix="replay-cost-")
    try:
        data_dir = os.path.join(workdir, "node")
        log_bytes = write_log(data_dir, args.keys, args.log_keys, args.batch, args.value_bytes, args.save_entries)
        restores: list[tuple[float, float]] = []
        replays: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            restores.append(timed(lambda: KeyValueStore().restore(snapshot)))
            holding = KeyValueStore()
            holding.restore(snapshot)

            def replay(store: KeyValueStore = holding) -> None:
                storage = DiskStorage(data_dir)
                try:
                    for entry in storage.load().entries:
                        store.apply(args.keys + 2 + entry.index, entry.data)
                finally:
                    storage.close()
            replays.append(timed(replay))
            print(f"restore {restores[-1][0]:.2f} s CPU ({restores[-1][1]:.2f} wall), replay {replays[-1][0]:.2f} s "
                  f"CPU ({replays[-1][1]:.2f} wall)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    snapshot_mb, log_mb = len(snapshot) / 1e6, log_bytes / 1e6
    restore_cpu = statistics.median(c for c, _ in restores)
    replay_cpu = statistics.median(c for c, _ in replays)
    restore_per_mb, replay_per_mb = restore_cpu / snapshot_mb, replay_cpu / log_mb
    ratio = (args.within - 1) * restore_per_mb / replay_per_mb
    out = {"snapshot_mb": round(snapshot_mb, 1), "log_mb": round(log_mb, 1), "restore_cpu_s": round(restore_cpu, 3),
           "replay_cpu_s": round(replay_cpu, 3), "restore_ms_per_mb": round(restore_per_mb * 1e3, 2),
           "replay_ms_per_mb": round(replay_per_mb * 1e3, 2), f"ratio_within_{args.within:g}x": round(ratio, 3),
           "loadavg": os.getloadavg()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
