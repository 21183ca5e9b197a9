"""Seeded random schedules over 3-, 5- and 7-node simulated clusters, with safety checked after every tick and
liveness after healing. `--sim-seeds N` runs N schedules; a failure prints the command that replays it
(`python tests/simulator.py --seed S --size N`)."""

from __future__ import annotations

from simulator import random_schedule

SIZES = (3, 5, 7)
CHUNK = 60


def _chunks(total: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]


def pytest_generate_tests(metafunc):
    if "schedule_range" in metafunc.fixturenames:
        total = metafunc.config.getoption("--sim-seeds")
        metafunc.parametrize("schedule_range", _chunks(total), ids=lambda r: f"{r[0]}-{r[1]}")


def test_random_schedules(schedule_range, request):
    """Schedule k runs seed k // 3 on a cluster of SIZES[k % 3] nodes."""
    start, stop = schedule_range
    reads = writes = 0
    for k in range(start, stop):
        cluster = random_schedule(k // 3, SIZES[k % 3])
        reads += cluster.reads_checked
        writes += len(cluster.acked_writes)
    assert writes > 0 and reads > 0, "the schedules exercised no client traffic"
