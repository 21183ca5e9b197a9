"""tests/background.py, the background workers of the CPU-bound tests: a job that fails in a worker fails its test
(with the simulator's replay command), and so does a job whose worker died, that no worker ran, or that is not
done in time. None of these may pass."""

from __future__ import annotations

import os
import re
import time

import pytest

import background
from background import BackgroundJobFailed, BackgroundJobs, Job

# The CI simulator's first schedules with a deliberately broken core (tests/test_mutations.py): vote_twice is
# caught at schedule 3 today, within its budget of 40.
BROKEN_CHUNK = Job("test_simulation", "schedules_run", (0, 40, "vote_twice"))
LONG_CHUNK = Job("test_simulation", "schedules_run", (0, 60))  # ~10 s of CPU: still running when it is looked at
ONE_SCHEDULE = Job("test_simulation", "schedules_run", (0, 1))
DIES = Job("os", "_exit", (3,))  # the worker process ends at once, with code 3, in the middle of its job


@pytest.fixture
def pools():
    """BackgroundJobs made by the test, every one closed (its workers stopped) at the end."""
    made = []
    yield lambda *args, **kwargs: made.append(BackgroundJobs(*args, **kwargs)) or made[-1]
    for pool in made:
        pool.close()


def test_a_schedule_that_fails_in_a_worker_fails_its_test_with_the_replay_command(pools):
    pool = pools([BROKEN_CHUNK], workers=1, timeout=600, run_here=False)
    with pytest.raises(BackgroundJobFailed) as failed:
        pool.result(BROKEN_CHUNK)
    message = str(failed.value)
    # vote_twice is caught by the one-vote check (since the hold fault, at schedule 0) or by election safety.
    assert "SafetyViolation" in message and ("election safety" in message or "one vote per term" in message), message
    assert re.search(r"replay: python tests/simulator.py --seed \d+ --size \d --mutation vote_twice", message)
    ran_in = int(re.search(r"raised \(in pid (\d+)\)", message).group(1))
    assert ran_in in pool.workers and ran_in != os.getpid()


@pytest.mark.parametrize("job, workers, why", [
    (DIES, 1, "exited with code 3"),  # its worker died in it
    (ONE_SCHEDULE, 0, "no worker took it"),  # no worker ran it (and this process may not)
], ids=["worker-died", "no-worker"])
def test_a_job_no_worker_finished_fails(pools, job, workers, why):
    pool = pools([job], workers=workers, timeout=600, run_here=False)
    with pytest.raises(BackgroundJobFailed, match=why):
        pool.result(job)


def test_a_worker_killed_in_its_job_fails_that_job(pools):
    pool = pools([LONG_CHUNK], workers=1, timeout=600, run_here=False)
    (pid,) = pool.workers
    deadline = time.monotonic() + 120
    while background.taker(pool.folder, 0) != pid:  # the worker has taken the job (after its imports)
        assert time.monotonic() < deadline and pool.workers[pid].poll() is None, "the worker never took its job"
        time.sleep(0.05)
    assert os.getpriority(os.PRIO_PROCESS, pid) == background.WORKER_NICE  # background work, until asked for
    os.kill(pid, 9)
    with pytest.raises(BackgroundJobFailed, match="exited with code -9"):
        pool.result(LONG_CHUNK)


def test_a_dead_worker_fails_the_jobs_this_process_could_still_run(pools):
    """A worker that died fails every job from then on, even those the pytest process would run itself: a pool
    that quietly lost its workers would otherwise go on, slower, with nobody told."""
    pool = pools([DIES, ONE_SCHEDULE], workers=1, timeout=600)
    (worker,) = pool.workers.values()
    assert worker.wait(120) == 3  # it took the first job, which ended it
    with pytest.raises(BackgroundJobFailed, match="exited with code 3"):
        pool.result(ONE_SCHEDULE)


def test_a_job_not_done_in_time_fails_and_its_worker_is_stopped(pools):
    pool = pools([LONG_CHUNK], workers=1, timeout=0.5, run_here=False)
    with pytest.raises(BackgroundJobFailed, match="not done after 0s of waiting"):
        pool.result(LONG_CHUNK)
    (worker,) = pool.workers.values()
    if os.geteuid() == 0:  # asked for, its job is on the critical path: back to nice 0 (where allowed)
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == 0
    pool.close()
    assert worker.poll() is not None and not os.path.exists(pool.folder)


def test_a_job_nobody_took_runs_here_with_the_same_value(pools):
    pool = pools([ONE_SCHEDULE], workers=0, timeout=600)
    assert pool.result(ONE_SCHEDULE) == ONE_SCHEDULE.run()
    assert background.taker(pool.folder, 0) == os.getpid()


PRIORITY_OF_ITS_PROCESS = Job("posix", "getpriority", (os.PRIO_PROCESS, 0))  # what the job's processes inherit


def test_a_job_that_waits_runs_at_this_process_priority_not_at_nice_19(pools):
    """A fault run starts its nodes from its worker: they inherit the worker's priority, which must be the suite's
    own (at nice 19 they would be starved by the suite's clusters, and their liveness checks would fail)."""
    pool = pools([PRIORITY_OF_ITS_PROCESS], workers=1, timeout=600, run_here=False, nice=None)
    assert pool.result(PRIORITY_OF_ITS_PROCESS) == os.getpriority(os.PRIO_PROCESS, 0) != background.WORKER_NICE


SLEEP = Job("time", "sleep", (1.0,))  # a job that waits, as a fault run does
PID_OF_ITS_PROCESS = Job("os", "getpid", ())


def test_jobs_that_wait_never_run_here_beside_a_worker(pools):
    """overlap=False (the fault runs' pool): asked for a job nobody has taken while the worker still runs another,
    this process waits for the worker instead of running it beside (two fault runs at once starved each other's
    nodes). With overlap (the CPU-bound pool) it runs it here, as before."""
    for overlap, runs_here in ((False, False), (True, True)):
        pool = pools([SLEEP, PID_OF_ITS_PROCESS], workers=1, timeout=600, nice=None, overlap=overlap)
        (pid,) = pool.workers
        deadline = time.monotonic() + 120
        while background.taker(pool.folder, 0) != pid:  # the worker is in the first job
            assert time.monotonic() < deadline and pool.workers[pid].poll() is None, "the worker never took its job"
            time.sleep(0.01)
        ran_in = pool.result(PID_OF_ITS_PROCESS)
        assert (ran_in == os.getpid()) is runs_here and (ran_in == pid) is not runs_here, (overlap, ran_in, pid)


@pytest.mark.background(os.getpriority, os.PRIO_PROCESS, 0, waits=True)
def test_a_mark_with_waits_goes_to_the_pool_at_this_process_priority(request, background_result):
    """tests/conftest.py gives a `waits=True` job to the pool of WAITING_WORKERS at this process's priority."""
    from conftest import BACKGROUND_JOBS

    waiting = request.config.stash[BACKGROUND_JOBS][True]
    assert PRIORITY_OF_ITS_PROCESS in waiting.jobs
    assert len(waiting.workers) <= background.WAITING_WORKERS
    assert background_result() == os.getpriority(os.PRIO_PROCESS, 0)


class MarkedItem:
    """A stand-in for a collected test: only its marks (what conftest._skipped reads)."""

    def __init__(self, *marks) -> None:
        self.marks = [m.mark for m in marks]

    def iter_markers(self):
        return iter(self.marks)


def test_the_job_of_a_test_that_will_be_skipped_is_not_started():
    """A fault run whose test is skipped (no network namespaces) would take the waiting worker for nothing."""
    from conftest import _skipped

    job = pytest.mark.background.with_args(print)
    assert _skipped(MarkedItem(pytest.mark.skipif(True, reason="no netns"), job))
    assert _skipped(MarkedItem(pytest.mark.skip(reason="never")))
    assert not _skipped(MarkedItem(pytest.mark.skipif(False, reason="has netns"), job))
