"""CPU-bound test work run in background processes while the rest of the suite runs.

Most of the suite is clusters of processes that mostly wait (sockets, elections, fsync); a few tests are long pure
computations (the simulator's seeded schedules, the crash explorer). Such a test is marked
`@pytest.mark.background(function, *args)`: `function(*args)` is its job, which must return something JSON can
hold and must live in a module that does not monkey-patch gevent at import (the worker imports it by name; a lone
function needs `pytest.mark.background.with_args(function)`, or pytest takes it for the test it decorates).

tests/conftest.py moves the background tests to the end of the session (in their order) and, once pytest has
collected it, starts `BackgroundJobs` over their jobs: worker processes (plain subprocesses running this file,
never forks of the gevent-patched pytest process), at most max(1, cpu_count - 1), at nice 19, each taking the
next job nobody has taken yet, in the order the tests will ask for them. While the pytest process runs the tests
that mostly wait, the workers get the CPU those leave idle. When the first background test asks for its result
the workers go back to nice 0 (the session now waits for them), and each test's job is either done, or being
computed by a worker (waited for, bounded), or taken by nobody yet: then the pytest process runs it itself, as
before, so running one file alone is no slower than before. While it waits, the pytest process runs the last job
nobody has taken yet.

Protocol, in a temporary folder: `jobs.json` lists the jobs; a job is taken by linking a file holding the taker's
pid to `<n>.taken` (atomic: one taker wins); its outcome is written to `<n>.tmp` and renamed to `<n>.json`:
{"ok": true, "value": ...} or {"ok": false, "error": the traceback}. A job that raised fails its test with that
traceback (a simulator's SafetyViolation carries its replay command); so does a job whose worker died, or that is
not done after the timeout.

Jobs that mostly wait (`@pytest.mark.background(function, *args, waits=True)`: a fault run, whose job starts a
cluster of processes and waits for its verdict) have a pool of their own: WAITING_WORKERS workers at the pytest
process's priority (nice 0 in CI), from the start. At nice 19 they would start their nodes at nice 19 too
(inherited), and the suite's own clusters would starve them: their elections and liveness checks would fail or be
flaky. At the suite's priority they compete with it as equals, so they are few: one worker, whose cluster is one
more the machine runs beside the suite's (the CI fault runs, ~290 s in all, fit well inside the rest of the
suite's ~12 minutes), and the pytest process never runs one of them beside the worker's (overlap=False): it waits
for the worker, and runs a job itself only when no worker is left.

`python tests/background.py --dir DIR` is the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

if __name__ == "__main__":  # `python tests/background.py` from anywhere: the project and tests/ importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER_NICE = 19  # CPU-bound jobs: only the CPU the suite leaves idle, until the session waits for them
WAITING_WORKERS = 1  # jobs that mostly wait run at the suite's priority (their nodes inherit it): one at a time
POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 5.0


class BackgroundJobFailed(AssertionError):
    """A job raised, its worker died, or it was not done in time: its test fails with this."""


@dataclass(frozen=True)
class Job:
    module: str
    function: str
    args: tuple = ()

    @classmethod
    def of_marker(cls, marker) -> Job:
        function, *args = marker.args
        return cls(function.__module__, function.__name__, tuple(args))

    def __str__(self) -> str:
        return f"{self.module}.{self.function}{self.args!r}"

    def run(self):
        return getattr(importlib.import_module(self.module), self.function)(*self.args)


def run_and_record(job: Job, folder: str, number: int) -> None:
    """Run `job` here and write its outcome as `<number>.json` (atomically: a reader sees all of it or nothing)."""
    started, cpu = time.monotonic(), time.process_time()
    try:
        outcome = {"ok": True, "value": job.run()}
    except Exception:
        outcome = {"ok": False, "error": traceback.format_exc()}
    outcome.update(pid=os.getpid(), seconds=time.monotonic() - started, cpu_seconds=time.process_time() - cpu)
    tmp = os.path.join(folder, f"{number}.tmp")
    with open(tmp, "w") as f:
        json.dump(outcome, f)
    os.replace(tmp, os.path.join(folder, f"{number}.json"))


def take(folder: str, number: int) -> bool:
    """Whether this process took job `number` (first come; the file names the taker's pid from the start)."""
    mine = os.path.join(folder, f"{number}.taking-{os.getpid()}")
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        os.link(mine, os.path.join(folder, f"{number}.taken"))
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(mine)


def taker(folder: str, number: int) -> int | None:
    try:
        with open(os.path.join(folder, f"{number}.taken")) as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def outcome(folder: str, number: int) -> dict | None:
    try:
        with open(os.path.join(folder, f"{number}.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class BackgroundJobs:
    """The jobs of a session, their workers and their outcomes (see the module's docstring)."""

    def __init__(self, jobs: list[Job], workers: int, timeout: float, run_here: bool = True,
                 nice: int | None = WORKER_NICE, overlap: bool = True) -> None:
        """`workers` processes are started at once (none when there is no job), at `nice` (None: this process's,
        for jobs that mostly wait; see the module's docstring). `timeout`: the longest wait for a job a worker is
        running. `run_here=False` (tests of this mechanism): never run a job in this process. `overlap=False`
        (jobs that mostly wait): this process runs a job only once no worker is running, never beside one."""
        self.jobs = list(dict.fromkeys(jobs))
        self.numbers = {job: n for n, job in enumerate(self.jobs)}
        self.timeout, self.run_here, self.overlap = timeout, run_here, overlap
        self.reniced = nice is None  # nothing to undo
        self.folder = tempfile.mkdtemp(prefix="raftdzmq-background-")
        with open(os.path.join(self.folder, "jobs.json"), "w") as f:
            json.dump([[j.module, j.function, list(j.args)] for j in self.jobs], f)
        self.workers: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, str] = {}
        for i in range(min(workers, len(self.jobs))):
            log = os.path.join(self.folder, f"worker-{i}.log")
            with open(log, "wb") as out:
                p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--dir", self.folder],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            # Set here, not by the worker: so that _on_the_critical_path, later in this process, always wins.
            if nice is not None:
                with contextlib.suppress(ProcessLookupError):  # it died already: _check_workers says so
                    os.setpriority(os.PRIO_PROCESS, p.pid, nice)
            self.workers[p.pid], self.logs[p.pid] = p, log

    def result(self, job: Job):
        """The job's value; raises BackgroundJobFailed if it raised, its worker died, or it is not done within
        the timeout of waiting for it."""
        number = self.numbers[job]
        self._on_the_critical_path()
        waited_since = None
        while (done := outcome(self.folder, number)) is None:
            self._check_workers(job)
            if self._may_run_here() and take(self.folder, number):
                run_and_record(job, self.folder, number)
                continue
            pid = taker(self.folder, number)
            worker = self.workers.get(pid) if pid is not None else None
            if pid is None and not self._running():
                raise BackgroundJobFailed(f"{job}: no worker took it, and none is running")
            if worker is not None and worker.poll() is not None and outcome(self.folder, number) is None:
                raise BackgroundJobFailed(f"{job}: its worker (pid {pid}) exited before it was done")
            if self._may_run_here() and self._run_one_nobody_took():
                waited_since = None
                continue
            if waited_since is None:
                waited_since = time.monotonic()
            if time.monotonic() - waited_since > self.timeout:
                raise BackgroundJobFailed(f"{job}: not done after {self.timeout:.0f}s of waiting for it "
                                          f"(taken by pid {pid})")
            time.sleep(POLL_SECONDS)
        if not done["ok"]:
            raise BackgroundJobFailed(f"{job} raised (in pid {done['pid']}):\n{done['error']}")
        return done["value"]

    def _check_workers(self, job: Job) -> None:
        """A worker that died (exit code not 0) fails every background test from then on: the jobs it took are
        lost, and a mechanism that quietly falls back to running everything here would hide it."""
        for pid, p in self.workers.items():
            if p.poll() not in (None, 0):
                raise BackgroundJobFailed(f"{job}: the background worker pid {pid} exited with code {p.returncode}; "
                                          f"its output ends with:\n{self._tail(pid)}")

    def _running(self) -> bool:
        return any(p.poll() is None for p in self.workers.values())

    def _may_run_here(self) -> bool:
        """Whether this process may take a job now: two fault runs at once (the worker's and one here) starved
        each other's nodes, and a run meant to be caught by the checker came out clean (cispeed2)."""
        return self.run_here and (self.overlap or not self._running())

    def _run_one_nobody_took(self) -> bool:
        """Run the last job nobody has taken (the workers take them from the first): True if there was one."""
        for number in reversed(range(len(self.jobs))):
            if taker(self.folder, number) is None and take(self.folder, number):
                run_and_record(self.jobs[number], self.folder, number)
                return True
        return False

    def _on_the_critical_path(self) -> None:
        """A test asks for a result: the session now waits for the jobs (the background tests run last), which
        are no longer background work. The workers go back to nice 0 (where allowed): at nice 19 they would get
        next to no CPU while this process runs a job itself, or while others' processes load the machine."""
        if self.reniced:
            return
        self.reniced = True
        for pid, p in self.workers.items():
            try:
                if p.poll() is None:
                    os.setpriority(os.PRIO_PROCESS, pid, 0)
            except OSError:  # not permitted (not root), or it has just exited
                pass

    def _tail(self, pid: int, lines: int = 30) -> str:
        with open(self.logs[pid], errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def close(self) -> None:
        """Stop every worker by its pid (SIGTERM, then SIGKILL after a grace period) and remove the folder."""
        for p in self.workers.values():
            if p.poll() is None:
                p.terminate()
        for p in self.workers.values():
            try:
                p.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(STOP_GRACE_SECONDS)
        shutil.rmtree(self.folder, ignore_errors=True)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the pytest process dies, even by SIGKILL (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def work(folder: str) -> None:
    """The worker: take every job nobody has taken yet, first to last, and record each outcome."""
    parent = os.getppid()
    _die_with_parent()
    import logging

    logging.disable(logging.WARNING)  # e.g. torn tails cut after simulated crashes: expected by the thousand
    with open(os.path.join(folder, "jobs.json")) as f:
        jobs = [Job(module, function, tuple(args)) for module, function, args in json.load(f)]
    for number, job in enumerate(jobs):
        if os.getppid() != parent:  # the pytest process is gone
            return
        if taker(folder, number) is None and take(folder, number):
            run_and_record(job, folder, number)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A worker of tests/background.py (started by tests/conftest.py).")
    parser.add_argument("--dir", required=True, help="the folder of jobs.json and the outcomes")
    work(parser.parse_args().dir)
