"""mypy on raftlib: the library type-checks, and its implementations conform to the protocols of
raftlib.interfaces by type (tests/typing_conformance.py). The configuration is pyproject.toml's [tool.mypy]."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mypy(*args: str) -> subprocess.CompletedProcess:
    # No cache: it would be a folder in the checkout. A cold run takes a few seconds.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"), "--cache-dir",
         os.devnull, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_raftlib_type_checks_and_its_implementations_conform_to_the_protocols():
    out = mypy()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "typing_conformance" not in out.stdout and out.stdout.startswith("Success"), out.stdout


def test_a_storage_that_does_not_conform_fails_the_check(tmp_path):
    """The check can fail: a storage whose save() lacks `sync` is not a Storage, and neither is a transport
    without set_peers, though both would run until the runtime called the missing piece."""
    bad = tmp_path / "bad_conformance.py"
    bad.write_text(textwrap.dedent("""
        from raftlib import Storage, StoredState, Transport


        class NoSync:
            log_bytes = 0

            def load(self):
                return StoredState()

            def save(self, hard_state, entries, snapshot=None):  # no `sync`
                pass

            def save_snapshot(self, snapshot):
                pass


        class SendOnly:
            def send(self, messages):
                pass


        def storage(s: NoSync) -> Storage:
            return s


        def transport(t: SendOnly) -> Transport:
            return t
    """))
    out = mypy(str(bad))
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, out.stdout
    assert any('"NoSync"' in e and '"Storage"' in e for e in errors), out.stdout
    assert any('"SendOnly"' in e and '"Transport"' in e for e in errors), out.stdout
