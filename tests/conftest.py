import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from background import BackgroundJobs, Job  # noqa: E402  (tests/ is importable from here on)

BACKGROUND_JOBS = pytest.StashKey[BackgroundJobs]()


def pytest_addoption(parser):
    parser.addoption("--sim-seeds", type=int, default=2000, help="random simulator schedules to run (CI: 2000)")
    parser.addoption("--background-timeout", type=float, default=900.0,
                     help="seconds a test waits for its background job once a worker runs it (tests/background.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "background(function, *args): the test's CPU-bound part, function(*args), "
                                       "runs in a background worker from the session's start (tests/background.py)")


def pytest_collection_modifyitems(session, config, items):
    """The background tests last (in their order): the pytest process runs the tests that mostly wait first, while
    the workers compute the jobs, and by the time it asks for their results most are there."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # a stable sort


def pytest_collection_finish(session):
    """Start the background jobs of the tests collected (after -k and the like): workers at nice 19 compute them
    while the rest of the suite, mostly waiting on clusters of processes, runs."""
    if session.config.option.collectonly:
        return
    jobs = [Job.of_marker(m) for item in session.items if (m := item.get_closest_marker("background"))]
    if jobs:
        pool = BackgroundJobs(jobs, workers=max(1, (os.cpu_count() or 1) - 1),
                              timeout=session.config.getoption("--background-timeout"))
        session.config.stash[BACKGROUND_JOBS] = pool
        session.config.add_cleanup(pool.close)  # also after a failure or Ctrl-C


@pytest.fixture
def background_result(request):
    """`background_result()`: the value of the test's `background` job (waited for; it raises if the job raised,
    its worker died or it was not done in time). Without a pool of workers, the job runs here."""
    job = Job.of_marker(request.node.get_closest_marker("background"))
    pool = request.config.stash.get(BACKGROUND_JOBS, None)
    return (lambda: pool.result(job)) if pool is not None else job.run
