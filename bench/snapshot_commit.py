#!/usr/bin/env python
"""The loop's work at a snapshot's commit point (issue 13, issue tracker 13's "snapshot stall"): a node's own
snapshot written under its *.tmp name (as a forked child writes it), then `DiskStorage.commit_snapshot` timed in
this process, on real files, with a realistic log since the snapshot: --entries entries of --entry-bytes each
(default 3,000 entries of 15 KB: 100-put transactions), saved after the snapshot's index as the node saves them
while its child writes (--batch entries a save, fdatasynced).

A build that pre-builds the new segment (DiskStorage.begin_base/base_step: the base group written in bounded
steps while the child writes, its bulk fdatasynced off the loop) is driven as the runtime drives it: a step after
every save (--step-bytes of entries a call, as the runtime's BASE_STEP_BYTES), the bulk synced before the commit (as the runtime's threadpool does, not timed:
it is off the loop), and the old segment's unlink after the commit too (DiskStorage.garbage_job, the threadpool's
in the runtime); the longest step is reported too. A build without them commits the old way.

    python bench/snapshot_commit.py                                  # this checkout
    python bench/snapshot_commit.py --vs-build /work/main --rounds 5 # alternating this and another checkout

Prints per round and build: the commit's wall time (ms) and where it went (each file-system call the commit made,
timed by kind: fdatasync, fsync_dir, rename, append, ...; "other": the rest, Python), the longest pre-build step (ms) and the steps' total time
over the saves' (fdatasynced: the pre-build's cost on the write path); then the medians and the ratio. Speed is measured here, never asserted in a test; note `uptime` next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


TIMED_CALLS = ("fdatasync", "fsync", "fsync_dir", "rename", "append", "create", "close", "open_read", "pread",
               "truncate", "listdir", "unlink")


def timed_calls(fs) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap `fs`'s file-system calls (on the instance): each kind's total wall time and number of calls accrue in
    the two dicts returned. `untimed(fs)` puts the class's methods back."""
    spent = {name: 0.0 for name in TIMED_CALLS if hasattr(fs, name)}
    counts = dict.fromkeys(spent, 0)
    for name in spent:
        def timed(*args, _call=getattr(fs, name), _name=name):
            t0 = time.perf_counter()
            try:
                return _call(*args)
            finally:
                spent[_name] += time.perf_counter() - t0
                counts[_name] += 1
        setattr(fs, name, timed)
    return spent, counts


def untimed(fs) -> None:
    for name in TIMED_CALLS:
        if name in vars(fs):
            delattr(fs, name)


def one_round(entries: int, entry_bytes: int, batch: int, step_bytes: int, folder: str) -> dict:
    from raftlib import Entry, EntryKind, HardState, Member, Membership, Snapshot
    from raftlib.storage import DiskStorage

    data_dir = tempfile.mkdtemp(dir=folder)
    try:
        s = DiskStorage(data_dir)
        s.load()
        membership = Membership(voters=("a",), members=(Member("a", "127.0.0.1:1", "127.0.0.1:2"),))
        payload = os.urandom(entry_bytes)
        s.save(HardState(1, "a", 10), [Entry(1, i, EntryKind.COMMAND, payload) for i in range(1, 11)])
        snap = Snapshot(10, 1, membership, os.urandom(1 << 20))
        tmp = s.begin_snapshot(10)
        s.write_snapshot(snap, tmp)  # the child's part
        prebuild = hasattr(s, "begin_base")
        if prebuild:
            s.begin_base(snap)
        longest_step = steps_total = saves_total = 0.0
        index = 11
        while index < 11 + entries:
            n = min(batch, 11 + entries - index)
            batch_entries = [Entry(1, i, EntryKind.COMMAND, payload) for i in range(index, index + n)]
            t0 = time.perf_counter()
            s.save(HardState(1, "a", index - 1), batch_entries)
            saves_total += time.perf_counter() - t0
            index += n
            if prebuild:
                t0 = time.perf_counter()
                s.base_step(step_bytes)
                took_step = time.perf_counter() - t0
                longest_step = max(longest_step, took_step)
                steps_total += took_step
        if prebuild:
            job = s.base_sync_job()
            if job is not None:
                job[1](job[0]())  # the runtime runs the first off the loop, the second in it: not timed
        if hasattr(s, "garbage_job"):
            s.unlink_garbage_later = True  # as the runtime sets it: the old files unlinked in a thread
        spent, counts = timed_calls(s.fs)
        t0 = time.perf_counter()
        s.commit_snapshot(snap, tmp)
        took = time.perf_counter() - t0
        untimed(s.fs)
        calls_ms = {f"{name} x{counts[name]}": round(seconds * 1e3, 2) for name, seconds in spent.items() if counts[name]}
        calls_ms["other"] = round(took * 1e3 - sum(spent.values()) * 1e3, 2)
        unlink = s.garbage_job() if hasattr(s, "garbage_job") else None
        if unlink is not None:
            unlink()  # the runtime's threadpool: not timed
        assert s.state.base_index == 10 and s.state.last_index == 10 + entries
        s.close()
        return {"commit_ms": took * 1e3, "commit_calls_ms": calls_ms, "step_ms": longest_step * 1e3, "log_mb": s.log_bytes / 1e6,
                "steps_per_saves": steps_total / saves_total}
    finally:
        shutil.rmtree(data_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=3000)
    p.add_argument("--entry-bytes", type=int, default=15000)
    p.add_argument("--batch", type=int, default=5, help="entries a save")
    p.add_argument("--step-bytes", type=int, default=256 << 10,
                   help="a pre-build step's bound, in bytes of entries (the runtime's BASE_STEP_BYTES)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--vs-build", default=None, help="another checkout, run alternately with this one")
    p.add_argument("--dir", default=None, help="where the temporary data dirs go (default: the system's tmp)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one round, JSON out
    args = p.parse_args()
    if args.one:
        folder = tempfile.mkdtemp(prefix="raftdzmq-bench-commit-", dir=args.dir)
        try:
            print(json.dumps(one_round(args.entries, args.entry_bytes, args.batch, args.step_bytes, folder)))
        finally:
            shutil.rmtree(folder)
        return
    builds = [("this", os.path.dirname(HERE))] + ([("other", os.path.abspath(args.vs_build))] if args.vs_build
                                                  else [])
    results: dict[str, list[dict]] = {name: [] for name, _ in builds}
    print(f"uptime: {os.getloadavg()}")
    for r in range(args.rounds):
        for name, root in builds:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--entries", str(args.entries),
                   "--entry-bytes", str(args.entry_bytes), "--batch", str(args.batch), "--step-bytes",
                   str(args.step_bytes)] + (["--dir", args.dir] if args.dir else [])
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                 env=dict(os.environ, PYTHONPATH=root), check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            results[name].append(got)
            print(f"round {r} {name:5} ({root}): commit {got['commit_ms']:8.2f} ms  longest step "
                  f"{got['step_ms']:6.2f} ms (all steps {got['steps_per_saves']:.2f}x the saves' time)  log since "
                  f"the snapshot {got['log_mb']:.1f} MB; the commit's calls {got.get('commit_calls_ms')}", flush=True)
    for name, root in builds:
        rs = results[name]
        print(f"{name:5} median commit {statistics.median(x['commit_ms'] for x in rs):8.2f} ms, longest step "
              f"{statistics.median(x['step_ms'] for x in rs):6.2f} ms ({root})")
    if args.vs_build:
        this = statistics.median(x["commit_ms"] for x in results["this"])
        other = statistics.median(x["commit_ms"] for x in results["other"])
        print(f"commit: this / other = {this / other:.4f}")
    print(f"uptime: {os.getloadavg()}")


if __name__ == "__main__":
    main()
