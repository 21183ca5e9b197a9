"""The transport in a subprocess that owns its gevent hub: reconnects (lazy pirate), the cap on inbound
connections, and who may connect with node keys (CURVE and ZAP), as whom."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_reconnects_after_dead_missing_and_returning_peers():
    out = subprocess.run([sys.executable, os.path.join(HERE, "transport_harness.py")], capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(HERE),
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    lines = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
    assert lines == {"never-existed": "ok", "killed-mid-request": "ok", "came-back": "ok", "over-the-cap": "ok",
                     "only-members-as-themselves": "ok",
                     "frames-within-the-limit": "ok", "reply-after-stall": "ok",
                     "late-reply-taken": "ok", "stopped-peer-given-up": "ok",
                     "restarted-peer-given-up": "ok"}, out.stdout + out.stderr
