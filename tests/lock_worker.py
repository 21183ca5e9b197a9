"""A process that contends for a lock through raftlib.client, for tests/test_client.py's lock tests.

    python lock_worker.py contend ENDPOINTS NAME ROUNDS OUT   take the lock ROUNDS times; a JSON line per hold
    python lock_worker.py hold ENDPOINTS NAME GO OUT          take it once, print "acquired TOKEN", wait until the
                                                             file GO exists, then do a fenced write and report

Each holder does, while it holds the lock, a fenced write: a txn that stores its token at FENCE only when the
stored token is lower (tokens zero-padded, so that the value compare is the number's). One whose outcome is
unknown is sent again: finding its own token there means the first one applied. The test stores a token of 0
first (a missing key's value compares false). The JSON line says whether the
write was taken ("fenced": true) or refused because a newer holder's token was there already."""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raftlib.client import Client, OutcomeUnknown, RaftdzmqError, get_op, put_op  # noqa: E402
from raftlib.concurrency import Lock  # noqa: E402

FENCE = "fence"


def token_text(token: int) -> str:
    return f"{token:020d}"


def fenced_write(client: Client, token: int) -> bool:
    """Store `token` at FENCE when the stored one is lower; False when a newer one is there."""
    mine = token_text(token)
    for _ in range(5):
        try:
            result = (client.txn().compare(FENCE, "value", "<", mine).success(put_op(FENCE, mine))
                      .failure(get_op(key=FENCE)).commit())
        except OutcomeUnknown:
            continue
        if result.succeeded:
            return True
        stored = result.kvs(0)[0].value.decode() if result.kvs(0) else ""
        return stored == mine  # our own earlier attempt applied
    raise RuntimeError("fenced write: outcome unknown five times")


def contend(client: Client, name: str, rounds: int, out_path: str) -> None:
    with open(out_path, "a") as out:
        for _ in range(rounds):
            try:
                lock = Lock(client, name, ttl=3, timeout=30)
                with lock as token:
                    start = time.time()
                    fenced = fenced_write(client, token)
                    time.sleep(0.05)
                    record = {"token": token, "start": start, "end": time.time(), "fenced": fenced,
                              "lost": lock.lost, "pid": os.getpid()}
            except RaftdzmqError as e:
                record = {"error": f"{type(e).__name__}: {e}", "pid": os.getpid()}
            out.write(json.dumps(record) + "\n")
            out.flush()


def hold(client: Client, name: str, go_path: str, out_path: str) -> None:
    lock = Lock(client, name, ttl=2, timeout=30)
    token = lock.acquire()
    print(f"acquired {token}", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(go_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the keepalive thread finds the lease gone meanwhile (it is a slow holder's business)
    fenced = fenced_write(client, token)
    lost = lock.lost
    lock.release()  # the lease is gone: this must not hang nor fail
    with open(out_path, "w") as out:
        out.write(json.dumps({"token": token, "fenced": fenced, "lost": lost}) + "\n")


def main() -> None:
    mode, endpoints, name = sys.argv[1:4]
    client = Client(endpoints, timeout=10)
    if mode == "contend":
        contend(client, name, int(sys.argv[4]), sys.argv[5])
    else:
        hold(client, name, sys.argv[4], sys.argv[5])


if __name__ == "__main__":
    main()
