"""The short CI version of the fault runs (tests/faults.py): real processes, a seeded nemesis, checked histories.
Each run is its own process, because the network-fault runs move themselves into the namespaces they make."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from procs import netns_unavailable

HERE = os.path.dirname(os.path.abspath(__file__))


def fault_run(*args: str, timeout: float = 240) -> tuple[int, str, dict | None]:
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "faults.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    result = None
    for line in stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if os.geteuid() == 0 else ""
    assert f"rdz{proc.pid % 100000}-" not in names, f"namespaces left behind: {names}"
    return proc.returncode, stdout + stderr, result


def assert_clean(code: int, output: str, result: dict | None, faults: set[str]) -> None:
    assert code == 0, output[-6000:]
    assert result is not None and result["linearizable"], output[-3000:]
    assert set(result["faults"]) == faults, result  # every kind of fault was injected at least once
    assert result["acknowledged_writes"] > 200, result
    assert result["operations"].get("read ok", 0) > 200, result
    print(json.dumps(result))


def test_three_nodes_through_kills_pauses_and_whole_cluster_restarts():
    code, output, result = fault_run("--nodes", "3", "--seconds", "30", "--seed", "1",
                                     "--faults", "kill,pause,restart-all")
    assert_clean(code, output, result, {"kill", "pause", "restart-all"})


def test_five_nodes_through_kills_pauses_and_whole_cluster_restarts():
    code, output, result = fault_run("--nodes", "5", "--seconds", "25", "--seed", "2",
                                     "--faults", "kill,pause,restart-all")
    assert_clean(code, output, result, {"kill", "pause", "restart-all"})


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
def test_three_nodes_through_partitions_and_packet_loss():
    code, output, result = fault_run("--nodes", "3", "--seconds", "30", "--seed", "5",
                                     "--faults", "partition,loss,kill,pause")
    assert_clean(code, output, result, {"partition", "loss", "kill", "pause"})


def test_lease_reads_stay_linearizable_through_kills_and_pauses():
    """?consistency=lease (thesis §6.4.1): leaders answer without a round while their lease lasts."""
    code, output, result = fault_run("--nodes", "3", "--seconds", "20", "--seed", "3", "--faults", "kill,pause",
                                     "--read-consistency", "lease")
    assert_clean(code, output, result, {"kill", "pause"})


def test_the_checker_catches_the_stale_reads_of_a_weaker_store():
    """The same run with ?consistency=stale reads (the Go original's only kind) must be caught: proof that the
    runs above could fail."""
    code, output, result = fault_run("--nodes", "3", "--seconds", "10", "--seed", "11", "--faults", "pause",
                                     "--read-consistency", "stale")
    assert code != 0 and result is None, output[-3000:]
    assert "is not linearizable" in output, output[-3000:]
