"""phivision.training.output_lock: one run per --output_dir; a dead run's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from phivision.training.output_lock import OutputDirBusy, OutputDirLock


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    first = OutputDirLock(tmp_path / "out")
    first.acquire()
    with pytest.raises(OutputDirBusy, match=rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()}"):
        OutputDirLock(tmp_path / "out").acquire()
    first.release()
    second = OutputDirLock(tmp_path / "out")
    second.acquire()  # free again
    assert second.taken_over is None
    second.release()
    assert not (tmp_path / "out" / ".run.lock").exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.mkdir()
    (out / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    lock = OutputDirLock(out)
    lock.acquire()
    assert lock.taken_over["pid"] == int(dead.stdout)
    assert json.loads((out / ".run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_run(tmp_path):
    """The pid of a killed run may belong to another process later: its start time tells them apart."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "1"}))
    lock = OutputDirLock(out)
    lock.acquire()
    assert lock.taken_over is not None
    lock.release()


def test_another_hosts_lock_is_respected_and_a_half_written_lock_is_not(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.lock").write_text(json.dumps({"host": "node-7", "pid": 12, "since": "2026-12-01 10:00:00"}))
    with pytest.raises(OutputDirBusy, match=r"host node-7, pid 12, since 2026-12-01 10:00:00.* delete .*\.run\.lock"):
        OutputDirLock(out).acquire()
    (out / ".run.lock").write_text('{"host": ')  # killed while writing its lock
    lock = OutputDirLock(out)
    lock.acquire()
    lock.release()
