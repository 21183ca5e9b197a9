#!/usr/bin/env python
"""Does freeing a big garbage file hold the log's fdatasync? (issue 13, lag10: after each snapshot's commit at
1,000,000 keys the loop's next fdatasync of the log took 12-23 ms, 30-40 ms after the commit, when the threadpool
unlinks the old snapshot, ~110 MB, and fsyncs the folders: DiskStorage.garbage_job.) In one process, on the file
system of --dir: a file of --mib MiB is written and fsynced, then freed by a thread while the main thread appends
1 KiB to another file and fdatasyncs it every 5 ms for 1.5 s; the file freed either whole (unlink, then the folder
fsynced, as garbage_job does) or cut --step-mib at a time first (ftruncate, each cut fdatasynced), alternating.
Reported per way: the slowest fdatasync beside the freeing, how many took over 10 ms, the median. On ext4 a
journal commit (which an fdatasync of an appended file waits for) frees, and with `-o discard` discards, the
blocks released since the one before. Bench only; asserts nothing. Note `uptime`: the machine is shared.

    python bench/garbage_unlink.py --mib 110 --step-mib 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time


def write_file(path: str, mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_whole(path: str, step_bytes: int) -> None:
    os.unlink(path)
    fsync_folder(os.path.dirname(path))


def free_in_steps(path: str, step_bytes: int) -> None:
    """As garbage_job: opened, unlinked (the folder fsynced), cut to a step or less through the descriptor (each
    cut fdatasynced), closed (which frees the rest)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        free_whole(path, step_bytes)
        while (size := os.fstat(fd).st_size) > step_bytes:
            os.ftruncate(fd, size - step_bytes)
            os.fdatasync(fd)
    finally:
        os.close(fd)


def fdatasyncs_beside(folder: str, mib: int, step_bytes: int, free) -> list[float]:
    """Milliseconds of each append + fdatasync of a small file while `free` frees a file of `mib` MiB."""
    path = os.path.join(folder, "garbage")
    write_file(path, mib)
    log = os.open(os.path.join(folder, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        time.sleep(0.5)
        freeing = threading.Thread(target=free, args=(path, step_bytes))
        took = []
        end = time.monotonic() + 1.5
        freeing.start()
        while time.monotonic() < end:
            started = time.perf_counter()
            os.write(log, b"x" * 1024)
            os.fdatasync(log)
            took.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)
        freeing.join()
    finally:
        os.close(log)
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="a folder on the file system to measure (default: a new one under $TMPDIR)")
    p.add_argument("--mib", type=int, default=110, help="the garbage file's size (a snapshot at 1M keys: ~110)")
    p.add_argument("--step-mib", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    folder = tempfile.mkdtemp(prefix="garbage-unlink-", dir=args.dir)
    print(f"garbage_unlink: {args.mib} MiB freed beside 1 KiB fdatasyncs in {folder}; "
          f"{os.popen('uptime').read().strip()}")
    try:
        for _ in range(args.rounds):
            for name, free in (("unlink whole", free_whole), (f"cut {args.step_mib} MiB a step", free_in_steps)):
                took = fdatasyncs_beside(folder, args.mib, args.step_mib << 20, free)
                print(f"  {name:18s} slowest fdatasync {max(took):6.1f} ms, over 10 ms {sum(t > 10 for t in took)}, "
                      f"median {statistics.median(took):.2f} ms", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"  {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
