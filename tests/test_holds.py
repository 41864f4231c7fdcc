"""Runs sharing one Hugging Face cache: a revision another live process holds is never deleted, and a
killed holder's hold goes with it (the kernel drops its lock: no guessing whether a run is alive)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckptavg.trajectory.holds import RevisionLedger

HOLDER = """
import sys, time
from pathlib import Path
from ckptavg.trajectory.holds import RevisionLedger
RevisionLedger(Path(sys.argv[1])).hold("c1")
print("held", flush=True)
time.sleep(600)
"""


def test_a_revision_held_elsewhere_is_deleted_only_after_its_holder_dies(tmp_path):
    ledger = RevisionLedger(tmp_path / "ledger")
    for commit in ("c1", "c2"):
        ledger.mark_downloaded(commit)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ledger")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        deleted: list[str] = []
        ledger.hold("c1")
        assert not ledger.let_go("c1", lambda: deleted.append("c1"))  # the other process holds it too
        assert ledger.let_go("c2", lambda: deleted.append("c2"))
        assert ledger.downloaded() == {"c1"} and deleted == ["c2"]
    finally:
        holder.kill()
        holder.communicate()
    assert ledger.let_go("c1", lambda: deleted.append("c1"))
    assert deleted == ["c2", "c1"] and ledger.downloaded() == set()
    assert not ledger.let_go("c3", lambda: deleted.append("c3"))  # never downloaded by ckptavg: never deleted


def test_a_read_only_cache_is_read_without_holds_and_nothing_in_it_is_deleted(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "none", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only filesystem here (needs root)")
    try:
        ledger = RevisionLedger(folder / ".locks" / "ckptavg" / "models--a--b")
        ledger.hold("c1")
        ledger.mark_downloaded("c1")
        assert ledger.held() == set() and ledger.downloaded() == set()
        assert not ledger.let_go("c1", lambda: pytest.fail("deleted from a read-only cache"))
    finally:
        subprocess.run(["umount", str(folder)], check=True)
