#!/usr/bin/env python
"""Run one raftdzmq node under cProfile (bench only): `python bench/profile_node.py OUT raftdzmq.py ARGS...`.

The node runs as raftdzmq.py would (gevent is patched first, as raftdzmq.py's first lines require); when it stops
(SIGTERM: raftdzmq.main returns) the profile of its main thread goes to OUT.<pid>.prof (pstats format: `python -m
pstats`, or bench/profile_node.py --show FILE). cProfile follows one thread's calls; greenlet switches make its
cumulative figures unreliable, so read the `tottime` (time in each function itself). Its overhead slows the node
down (roughly 1.5-2x in pure-Python code): compare shares, not rates. Used by watch_fanout.py --profile.
"""

from gevent import monkey

monkey.patch_all()

import cProfile  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402


def show(path: str, limit: int = 40) -> None:
    stats = pstats.Stats(path)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"{path}: {total:.2f} s of the main thread's CPU profiled")
    stats.sort_stats("tottime").print_stats(limit)


def main() -> int:
    if sys.argv[1] == "--show":
        show(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40)
        return 0
    out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    profile = cProfile.Profile()
    module = runpy.run_path(script, run_name="raftdzmq_profiled")  # defines main() without running it
    profile.enable()
    try:
        code = module["main"](args)
    finally:
        profile.disable()
        profile.dump_stats(f"{out}.{os.getpid()}.prof")
    return code


if __name__ == "__main__":
    sys.exit(main())
