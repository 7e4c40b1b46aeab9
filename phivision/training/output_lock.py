"""One run per --output_dir: a lock file naming the run that holds it (host, pid), taken over once that run is gone."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import SetupError

LOCK_NAME = ".run.lock"


class OutputDirBusy(SetupError):
    """Another run is writing into the same --output_dir."""


def _start_time(pid: int) -> str | None:
    """When process `pid` started (Linux), to tell it from a later process given the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True  # another machine's run: it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


class OutputDirLock:
    """Held by the main process of a run from its start to its end."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False
        self.taken_over: dict | None = None  # the dead run whose lock this one took

    def acquire(self) -> None:
        """Takes the lock, or raises OutputDirBusy naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}  # half-written by a run killed at that moment
                if owner and _alive(owner):
                    raise OutputDirBusy(
                        f"--output_dir {self.path.parent} is in use by another run (host {owner.get('host')}, pid "
                        f"{owner.get('pid')}, since {owner.get('since')}); wait for it, use another --output_dir, or "
                        f"delete {self.path} if that run is gone") from None
                self.path.unlink(missing_ok=True)  # left by a run that was killed
                self.taken_over = owner
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OutputDirBusy(f"--output_dir {self.path.parent}: cannot take {self.path} (another run keeps taking it)")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
