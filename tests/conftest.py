import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption("--sim-seeds", type=int, default=2000, help="random simulator schedules to run (CI: 2000)")
