import os
import shutil
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from background import WAITING_WORKERS, WORKER_NICE, BackgroundJobs, Job  # noqa: E402  (tests/ importable now)
from procs import log_tails  # noqa: E402

BACKGROUND_JOBS = pytest.StashKey[dict[bool, BackgroundJobs]]()  # by `waits`: the CPU-bound pool, the waiting pool
TEST_STARTED = pytest.StashKey[float]()  # time.time() as the test's setup began


def pytest_addoption(parser):
    parser.addoption("--sim-seeds", type=int, default=2000, help="random simulator schedules to run (CI: 2000)")
    parser.addoption("--background-timeout", type=float, default=900.0,
                     help="seconds a test waits for its background job once a worker runs it (tests/background.py)")


def pytest_configure(config):
    _cache_bytecode_of_started_processes(config)
    config.addinivalue_line("markers", "background(function, *args, waits=False): the test's long part, "
                                       "function(*args), runs in a background worker from the session's start; "
                                       "waits=True: a job that mostly waits, run at normal priority "
                                       "(tests/background.py)")


def _cache_bytecode_of_started_processes(config) -> None:
    """Let the processes the tests start (nodes, clients, background workers: several hundred a run) keep their
    bytecode, in a temporary folder removed at the end. With PYTHONDONTWRITEBYTECODE set, as on the machines this
    suite runs on, every one of them compiled raftlib and raftdzmq.py from source: ~0.2 s of CPU a start here."""
    if not os.environ.pop("PYTHONDONTWRITEBYTECODE", None) or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    prefix = os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="raftdzmq-test-pycache-")
    config.add_cleanup(lambda: shutil.rmtree(prefix, ignore_errors=True))


def pytest_collection_modifyitems(session, config, items):
    """The background tests last (in their order): the pytest process runs the tests that mostly wait first, while
    the workers compute the jobs, and by the time it asks for their results most are there."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # a stable sort


def pytest_collection_finish(session):
    """Start the background jobs of the tests collected (after -k and the like) that will run: CPU-bound ones in
    workers at nice 19, ones that mostly wait in WAITING_WORKERS workers at normal priority, both while the rest
    of the suite, mostly waiting on clusters of processes, runs."""
    if session.config.option.collectonly:
        return
    jobs: dict[bool, list[Job]] = {False: [], True: []}
    for item in session.items:
        if (marker := item.get_closest_marker("background")) and not _skipped(item):
            jobs[_waits(marker)].append(Job.of_marker(marker))
    timeout = session.config.getoption("--background-timeout")
    pools = session.config.stash[BACKGROUND_JOBS] = {}
    for waits, workers, nice in ((False, max(1, (os.cpu_count() or 1) - 1), WORKER_NICE),
                                 (True, WAITING_WORKERS, None)):
        if jobs[waits]:
            pools[waits] = BackgroundJobs(jobs[waits], workers=workers, timeout=timeout, nice=nice, overlap=not waits)
            session.config.add_cleanup(pools[waits].close)  # also after a failure or Ctrl-C


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[TEST_STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of the logs its nodes wrote (procs.log_tails): CI keeps no
    files, and a node that died or never served says why only there."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        tails = log_tails(item.stash.get(TEST_STARTED, 0.0) - 1.0)
        if tails:
            report.sections.append(("the logs of the nodes it ran (their last lines)", tails))


def _waits(marker) -> bool:
    return bool(marker.kwargs.get("waits", False))


def _skipped(item) -> bool:
    """Whether a skip or skipif mark with a plain true condition skips the test: its job would be work for nobody
    (a fault run without network namespaces would take a waiting worker for nothing)."""
    return any(m.name == "skip" or (m.name == "skipif" and any(c is True for c in m.args))
               for m in item.iter_markers())


@pytest.fixture
def background_result(request):
    """`background_result()`: the value of the test's `background` job (waited for; it raises if the job raised,
    its worker died or it was not done in time). Without a pool of workers, the job runs here."""
    marker = request.node.get_closest_marker("background")
    job = Job.of_marker(marker)
    pool = request.config.stash.get(BACKGROUND_JOBS, {}).get(_waits(marker))
    return (lambda: pool.result(job)) if pool is not None else job.run
