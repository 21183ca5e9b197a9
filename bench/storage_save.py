#!/usr/bin/env python
"""The cost of `DiskStorage.save()`: one record (a batch of N 100-byte entries plus a hard state) appended, and
fdatasynced when fsync is on. This is the write path's disk step; run it before and after touching storage.py.

    python bench/storage_save.py                      # batches of 1 and 64, fsync off and on
    python bench/storage_save.py --batch 64 --repeat 9 --number 2000

Prints the median over `--repeat` runs of the microseconds per save (timeit style: each run times `--number`
saves in a row in a fresh data dir, in a temporary folder that is removed afterwards).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftlib import Entry, EntryKind, HardState  # noqa: E402
from raftlib.storage import DiskStorage  # noqa: E402


def one_run(folder: str, batch: int, number: int, fsync: bool) -> float:
    data_dir = tempfile.mkdtemp(dir=folder)
    s = DiskStorage(data_dir, fsync=fsync)
    s.load()
    payload = b"v" * 100
    batches = []
    index = 1
    for i in range(number):
        batches.append((HardState(1, "a", index - 1), [Entry(1, j, EntryKind.COMMAND, payload)
                                                        for j in range(index, index + batch)]))
        index += batch
    save = s.save
    t0 = time.perf_counter()
    for hs, entries in batches:
        save(hs, entries)
    elapsed = time.perf_counter() - t0
    s.close()
    shutil.rmtree(data_dir)
    return elapsed / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--number", type=int, default=1000)
    p.add_argument("--dir", default=None, help="where to make the temporary data dirs (default: the system's tmp)")
    args = p.parse_args()
    folder = tempfile.mkdtemp(prefix="raftdzmq-bench-save-", dir=args.dir)
    try:
        for fsync in (False, True):
            for batch in args.batch:
                runs = [one_run(folder, batch, args.number, fsync) for _ in range(args.repeat)]
                print(f"save() batch={batch:<3} fsync={'on ' if fsync else 'off'}  median {statistics.median(runs):7.1f} us"
                      f"  (min {min(runs):.1f}, max {max(runs):.1f}, {args.repeat} runs of {args.number})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
