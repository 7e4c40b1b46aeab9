"""Recipe runs on two ranks without paying for the imports again: each rank is forked from a process that has
imported the libraries once.

A fresh Python process spends about 7.5 s of CPU importing torch, transformers, peft (and with it bitsandbytes and
torch's inductor) before a recipe does anything; a torchrun launch with 2 workers about 17 s. The suite launches
dozens, so this module keeps one "zygote" process per pytest process, with those imports done, and forks each rank
from it. A rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...; rank 0 hosts the
rendezvous store, where torchrun's agent would), a session of its own, the given working folder and environment,
and runs the script as `python script.py` would (`__main__`); when one rank fails the others are stopped, as
torchrun does. The code that runs is the recipe's, unchanged.

What this does not show is torchrun itself and a fresh interpreter's imports: the tests of those (SIGTERM passed on
by the launcher, a setup error printed once, the library notices on the console, the command-line entry points)
start real processes.

    python tests/forked.py   # the zygote: a JSON request per line on stdin; per request, the ranks' pids and then
                             # their exit status, a JSON line each on stdout
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the recipes import, and DeepSpeed, which the Trainer imports when a run asks for it.
PRELOAD = ("phivision.data", "phivision.training", "phivision.training_curves", "deepspeed", "matplotlib.pyplot")
FIXED_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----- the zygote (runs in its own process)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun --standalone sets for a worker on one node."""
    ranks = {"RANK": rank, "LOCAL_RANK": rank, "ROLE_RANK": rank, "WORLD_SIZE": world_size,
             "LOCAL_WORLD_SIZE": world_size, "ROLE_WORLD_SIZE": world_size, "GROUP_RANK": 0, "GROUP_WORLD_SIZE": 1,
             "MASTER_ADDR": "localhost", "MASTER_PORT": port, "TORCHELASTIC_RESTART_COUNT": 0,
             "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_RUN_ID": "forked", "ROLE_NAME": "default"}
    return {key: str(value) for key, value in ranks.items()}


def run_rank(request: dict, env: dict[str, str], protocol: int) -> None:
    """In the forked child: become `python script argv...` with `env`, and exit with its status."""
    code = 1
    try:
        os.close(protocol)
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(env)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            opened = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests' pipe stays the zygote's
        script = request["script"]
        sys.argv = [script, *request["argv"]]
        import runpy

        # What the interpreter does at start: the script's folder first, then PYTHONPATH, whose sitecustomize runs.
        extra = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path and path not in sys.path]
        sys.path[0:1] = [os.path.dirname(script), *extra]
        for path in extra:
            if os.path.isfile(os.path.join(path, "sitecustomize.py")):
                runpy.run_path(os.path.join(path, "sitecustomize.py"), run_name="sitecustomize")

        # What the interpreter does with the script: SystemExit's status, other exceptions through sys.excepthook
        # (the package installs one for its one-line errors), then the exit handlers.
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def stop(pids: dict[int, int], codes: dict[int, int]) -> None:
    """SIGTERM to each rank's session (DataLoader workers included), SIGKILL 10 s later to what is left."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline:
            reap(pids, codes)
            time.sleep(0.05)


def reap(pids: dict[int, int], codes: dict[int, int]) -> None:
    """Moves the ranks that have ended from `pids` (pid: rank) to `codes` (rank: exit status), in the order seen."""
    for pid in list(pids):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)


def serve() -> None:
    """Reads one request per line and forks its ranks; answers with their pids, then with their exit status once all
    have ended."""
    import importlib

    # The answers go to the original stdout; whatever else is printed (import notices) to stderr.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": os.getpid()}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        nproc, port = request["nproc"], free_port()
        pids, codes = {}, {}
        sys.stdout.flush()
        sys.stderr.flush()
        for rank in range(nproc or 1):
            env = {**request["env"], **(torchrun_environment(rank, nproc, port) if nproc else {})}
            pid = os.fork()
            if pid == 0:
                run_rank(request, env, protocol.fileno())
            pids[pid] = rank
        print(json.dumps({"pids": list(pids)}), file=protocol, flush=True)
        deadline = time.time() + request["timeout"]
        while pids:
            reap(pids, codes)
            if pids and (any(codes.values()) or time.time() > deadline):
                stop(pids, codes)
            time.sleep(0.05)
        # The status of the first rank to fail (codes keeps the order they ended in), as torchrun reports it.
        first = next((code for code in codes.values() if code), 0)
        print(json.dumps({"status": first, "codes": codes}), file=protocol, flush=True)


# ----- the client (in the pytest process)

class Zygote:
    """This pytest process's zygote, started on first use (about 8 s of imports) and ended with the process."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **FIXED_ENV})
        atexit.register(self.process.stdin.close)  # its loop ends at end of input
        self.buffer = b""
        self.running: ForkedRun | None = None  # the run whose end the zygote has still to report
        self.answer(timeout=300)

    def start(self, request: dict, log: Path) -> ForkedRun:
        """Starts the request's run. A run a failed test left behind is killed first: the zygote runs one at a time."""
        if self.running is not None and self.running.poll() is None:
            self.running.kill()
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        self.running = ForkedRun(self, self.answer(timeout=60)["pids"], log)
        return self.running

    def answer(self, timeout: float | None) -> dict | None:
        """The zygote's next answer; None when none came within `timeout` (0: do not wait)."""
        fd = self.process.stdout.fileno()
        deadline = None if timeout is None else time.time() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.time())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the zygote ended (exit status {self.process.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


_zygote: Zygote | None = None


class ForkedRun:
    """A run started by `forked_launch`, with what the tests use of subprocess.Popen: poll, wait, returncode, and
    `pids` (each rank's, the leader of its own session) in place of pid. Its output (stdout and stderr together)
    is in the file `log`."""

    def __init__(self, zygote: Zygote, pids: list[int], log: Path):
        self.zygote, self.pids, self.log, self.returncode = zygote, pids, log, None

    def poll(self) -> int | None:
        if self.returncode is None:
            ended = self.zygote.answer(timeout=0)
            if ended is not None:
                self.returncode = ended["status"]
        return self.returncode

    def kill(self) -> int:
        """SIGKILL to each rank and its session (a rank just forked may not have its own session yet)."""
        for pid in self.pids:
            for kill in (os.kill, os.killpg):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        return self.wait()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ended = self.zygote.answer(timeout)
            if ended is None:
                raise subprocess.TimeoutExpired(self.pids, timeout)
            self.returncode = ended["status"]
        return self.returncode


def forked_launch(script: Path, argv: list, nproc: int | None = 2, cwd: Path = ROOT, env: dict | None = None,
                  stdout: Path | None = None, stderr: Path | None = None, timeout: float = 600) -> ForkedRun:
    """Starts `script argv` on `nproc` ranks forked from the zygote (nproc None: one process, no torchrun
    environment), writing to `stdout` and `stderr` (by default both to a new log file); past `timeout` the ranks
    are stopped (SIGTERM, then SIGKILL)."""
    global _zygote
    if _zygote is None or _zygote.process.poll() is not None:
        _zygote = Zygote()
    if stdout is None:
        with tempfile.NamedTemporaryFile(prefix="run-", suffix=".log", delete=False) as log:
            stdout = Path(log.name)
    request = {"script": str(script), "argv": [str(a) for a in argv], "nproc": nproc, "cwd": str(cwd),
               "env": {**os.environ, **FIXED_ENV, **(env or {})}, "stdout": str(stdout),
               "stderr": str(stderr or stdout), "timeout": timeout}
    return _zygote.start(request, stdout)


def forked_run(script: Path, argv: list, nproc: int | None = 2, cwd: Path = ROOT, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`forked_launch`, waited for: what subprocess.run gives, the ranks' exit status (the first to fail's, else 0)
    and their output, stdout and stderr apart, interleaved as the ranks wrote it."""
    with tempfile.TemporaryDirectory(prefix="forked-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        run = forked_launch(script, argv, nproc, cwd, env, stdout=out, stderr=err, timeout=timeout)
        status = run.wait(timeout + 60)
        read = lambda path: path.read_text(errors="replace") if path.exists() else ""
        return subprocess.CompletedProcess([str(script), *argv], status, read(out), read(err))


if __name__ == "__main__":
    serve()
