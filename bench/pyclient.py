"""A keep-alive HTTP load client on gevent, for machines without wrk. Prints one JSON line of results.
Usage: python bench/pyclient.py URL CONCURRENCY SECONDS REQUESTS_FILE (a JSON list of [method, path, body])."""

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402


def main() -> None:
    url, concurrency, seconds, requests_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    with open(requests_file) as f:
        requests = [(m, p, b.encode() if b is not None else None, h) for m, p, b, h in json.load(f)]
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        while time.monotonic() < deadline:
            method, path, body, headers = requests[rng.randrange(len(requests))]
            t0 = time.monotonic()
            try:
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                if not 200 <= r.status < 300:  # a 307 to the new leader after an election is no write done either
                    errors[0] += 1
                    continue
            except OSError:
                errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                continue
            latencies.append(time.monotonic() - t0)

    gevent.joinall([gevent.spawn(worker, i) for i in range(concurrency)])
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6 if latencies else 0.0

    print(json.dumps({"requests": len(latencies), "errors": errors[0], "seconds": seconds,
                      "p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9)}))


if __name__ == "__main__":
    main()
