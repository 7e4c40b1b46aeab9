"""phivision.gpu_check: its plan, flags and disk checked on CPU, and the whole plan run on a tiny checkpoint on CPU,
with the process handling (timeouts, budget, error lines) it needs on the GPU machine."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from phivision import gpu_check
from phivision.training.arguments import build_parser

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["full-zero2", "lora-packed", "lora-resumed", "qlora", "frozen-cached", "bench", "zero3", "fsdp2"]


def full_setup(tmp_path, gpus=1):
    return gpu_check.Setup("cuda", "full", tmp_path, gpus)


def test_dry_run_prints_the_checks_in_order_with_their_disk_and_the_peak(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--device", "cuda", "--size", "full", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = re.findall(r"^([\w-]+): flags parse; disk ([\d.]+) GB", out, flags=re.M)
    assert [name for name, _ in names] == ORDER
    disk = dict(names)
    assert float(disk["full-zero2"]) == pytest.approx(8.3, abs=0.1)  # the final bf16 model, no checkpoint
    assert float(disk["fsdp2"]) == pytest.approx(16.6, abs=0.1)  # FSDP2 saves its fp32 weights
    peak = int(re.search(r"^peak disk: (\d+) GB$", out, flags=re.M).group(1))
    assert 17 <= peak <= 40  # the checkpoint (8.3 GB) plus the largest run, on a 64 GB disk
    commands = [shlex.split(line.strip()) for line in out.splitlines() if line.startswith("  ")]
    assert len(commands) == len(ORDER)
    assert all("--nproc_per_node=1" in c for c in commands if "torch.distributed.run" in c)
    recipes = [c for c in commands if "torch.distributed.run" in c]
    assert recipes and all("--bf16" in c for c in recipes)  # on the GPU every recipe run is in bf16
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_the_cpu_plan_runs_in_fp32(tmp_path):
    """bf16 matmuls run about 8x slower on CPUs without avx512_bf16; the CPU plan checks the plan, not bf16."""
    recipes = [c.command for c in gpu_check.plan(gpu_check.Setup("cpu", "tiny", tmp_path, 0)) if c.run_dir]
    assert recipes and not [c for c in recipes if "--bf16" in c]


def test_the_check_itself_never_initialises_cuda(tmp_path, monkeypatch, capsys):
    """A CUDA context (and the caching allocator's memory) in the parent would stay for the whole run: the GPU's
    name is asked in a subprocess, the checkpoint is built in one."""
    def no_cuda_here():
        raise AssertionError("CUDA initialised in the gpu_check process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda_here)
    monkeypatch.setattr(gpu_check, "gpu_name", lambda: "NVIDIA H200")
    assert gpu_check.main(["--dry-run", "--size", "tiny", "--workdir", str(tmp_path)]) == 0
    assert "GPUs: 1 (NVIDIA H200)" in capsys.readouterr().out


def test_only_the_resume_check_saves_a_checkpoint(tmp_path):
    """With --save_strategy steps the Trainer also saves at the last step: two 66 GB checkpoints per full run
    at --max_steps 3 --save_steps 2. Every run but lora-packed saves none; lora-packed saves one, at its end."""
    saving = {}
    for check in gpu_check.plan(full_setup(tmp_path, gpus=2)):
        if str(gpu_check.RECIPE) not in check.command:
            continue
        argv = check.command[check.command.index(str(gpu_check.RECIPE)) + 1:]
        training = build_parser().parse_known_args(argv)[0]
        saving[check.name] = (str(training.save_strategy), training.max_steps, training.save_steps)
    assert saving.pop("lora-packed") == ("steps", 2, 2)
    assert {strategy for strategy, _, _ in saving.values()} == {"no"}


def test_the_out_folder_never_gets_more_than_eight_files(tmp_path):
    names = gpu_check.log_names(gpu_check.plan(full_setup(tmp_path, gpus=8)))
    assert len(names) <= gpu_check.MAX_FILES and "results.json" in names and "prepare.log" in names


def test_a_flag_typo_in_the_plan_is_caught(tmp_path, monkeypatch, capsys):
    plan = gpu_check.plan

    def typo(setup):
        checks = plan(setup)
        checks[0].command.append("--batchsize")
        return checks

    monkeypatch.setattr(gpu_check, "plan", typo)
    assert gpu_check.main(["--dry-run", "--device", "cuda", "--size", "tiny", "--workdir", str(tmp_path)]) == 1
    assert "full-zero2: unknown flags ['--batchsize']" in capsys.readouterr().out


def test_a_bad_bench_flag_in_the_plan_is_caught(tmp_path, monkeypatch, capsys):
    plan = gpu_check.plan

    def typos(setup):
        checks = plan(setup)
        bench = next(c for c in checks if c.name == "bench")
        bench.command += ["--size", "huge"]
        return checks

    monkeypatch.setattr(gpu_check, "plan", typos)
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--size", "tiny", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "bench: a flag's value does not parse" in out.out and "invalid choice: 'huge'" in out.err


# A stand-in for torchrun: it starts a "worker" in a session of its own, which starts a child; all sleep.
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, sys.argv[1], "worker", sys.argv[2]], start_new_session=True)
open(sys.argv[2], "a").write(f"{worker.pid} ")
print("started", flush=True)
time.sleep(120)
"""
WORKER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[2], "a").write(f"{child.pid} ")
time.sleep(120)
"""


def test_a_check_past_its_timeout_is_killed_with_every_process_it_started(tmp_path):
    pids, launcher, worker = tmp_path / "pids", tmp_path / "launcher.py", tmp_path / "worker.py"
    launcher.write_text(LAUNCHER)
    worker.write_text(WORKER)
    check = gpu_check.Check("sleeper", [sys.executable, str(launcher), str(worker), str(pids)], "sleeper", timeout=4,
                            min_seconds=0)
    setup = gpu_check.Setup("cpu", "tiny", tmp_path / "work", 0)
    result = gpu_check.run_check(check, setup, tmp_path, time.monotonic() + 60, {})
    assert result.status == "fail" and result.error == "over its 4 s: killed with all its processes"
    assert 4 <= result.seconds < 30
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2  # the worker (own session) and its child
    for pid in started:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "started" in (tmp_path / "sleeper.log").read_text()


def test_when_gpu_check_is_interrupted_the_running_check_goes_with_it(tmp_path):
    """Ctrl-C or SIGTERM reaches gpu_check, not the check's workers in their own sessions: it kills them first."""
    pids, launcher, worker = tmp_path / "pids", tmp_path / "launcher.py", tmp_path / "worker.py"
    launcher.write_text(LAUNCHER)
    worker.write_text(WORKER)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3)
    try:
        with pytest.raises(KeyboardInterrupt):
            gpu_check.run_command([sys.executable, str(launcher), str(worker), str(pids)], tmp_path / "x.log", 60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2
    for pid in started:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_checks_stop_when_the_budget_is_spent(tmp_path):
    workdir = tmp_path / "work"
    setup = gpu_check.Setup("cpu", "tiny", workdir, 0)
    setup.data.mkdir(parents=True)  # prepared already: prepare() writes nothing
    setup.checkpoint.mkdir()
    sleep = [sys.executable, "-c", "import time; time.sleep(2)"]
    checks = [gpu_check.Check(name, sleep, name, timeout=10, min_seconds=1) for name in ("first", "second", "third")]
    out = tmp_path / "out"
    results = gpu_check.run_plan(setup, checks, out, deadline=time.monotonic() + 2.8, header={})
    assert results["first"].status == "pass"
    assert results["second"].summary() == results["third"].summary() == "not run: budget"
    saved = json.loads((out / "results.json").read_text())["checks"]
    assert saved["second"]["status"] == "not run" and saved["second"]["reason"] == "budget"
    assert sorted(p.name for p in out.iterdir()) == ["first.log", "results.json"]  # the others wrote no log


def test_a_check_cut_by_the_end_of_the_budget_is_stopped_not_failed(tmp_path):
    setup = gpu_check.Setup("cpu", "tiny", tmp_path / "work", 0)
    check = gpu_check.Check("long", [sys.executable, "-c", "import time; time.sleep(60)"], "long", timeout=300,
                            min_seconds=0)
    result = gpu_check.run_check(check, setup, tmp_path, time.monotonic() + 2, {})
    assert result.status == "stopped" and result.reason == "budget"


def test_a_failed_runs_error_line_is_the_workers_exception_not_torchruns_border(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import sys\nprint('step 1', flush=True)\nraise ValueError('pixel_values and image_sizes "
                      "disagree')\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]
    check = gpu_check.Check("crash", command, "crash", min_seconds=0)
    setup = gpu_check.Setup("cpu", "tiny", tmp_path / "work", 0)
    result = gpu_check.run_check(check, setup, tmp_path, time.monotonic() + 120, {})
    output = (tmp_path / "crash.log").read_text()
    assert "ChildFailedError" in output and output.rstrip().endswith("=" * 20)  # what the old report showed
    assert result.status == "fail"
    assert result.error == "ValueError: pixel_values and image_sizes disagree"


def test_error_line_reads_rank_prefixed_and_one_line_errors():
    assert gpu_check.error_line("[rank0]: torch.OutOfMemoryError: CUDA out of memory.\n" + "=" * 40) == \
        "torch.OutOfMemoryError: CUDA out of memory."
    assert gpu_check.error_line("loading\nerror: --batch_size 3 must be a multiple of 2\n") == \
        "error: --batch_size 3 must be a multiple of 2"
    assert gpu_check.error_line("no exception here\n-----\n") == "no exception here"


def test_a_check_whose_output_lacks_what_it_must_show_fails(tmp_path):
    setup = gpu_check.Setup("cpu", "tiny", tmp_path / "work", 0)
    check = gpu_check.Check("resume", [sys.executable, "-c", "print('trained from scratch')"], "resume",
                            expect="Resuming from", min_seconds=0)
    result = gpu_check.run_check(check, setup, tmp_path, time.monotonic() + 60, {})
    assert result.status == "fail" and "Resuming from" in result.error


def test_checks_are_skipped_for_a_missing_package_too_few_gpus_low_disk_or_a_failed_predecessor(tmp_path, monkeypatch):
    setup = gpu_check.Setup("cuda", "full", tmp_path, 1)
    run = [sys.executable, "-c", "pass"]
    deadline = time.monotonic() + 60
    skipped = {
        "package": gpu_check.Check("a", run, "a", needs=("no_such_package_here",), min_seconds=0),
        "gpus": gpu_check.Check("b", run, "b", min_gpus=2, min_seconds=0),
        "after": gpu_check.Check("c", run, "c", after="first", min_seconds=0),
        "disk": gpu_check.Check("d", run, "d", disk=1e15, min_seconds=0),
    }
    results = {"first": gpu_check.Result("fail")}
    reasons = {key: gpu_check.run_check(check, setup, tmp_path, deadline, results).summary()
               for key, check in skipped.items()}
    assert reasons["package"] == "skipped: no_such_package_here missing"
    assert reasons["gpus"] == "skipped: needs 2+ GPUs, 1 here"
    assert reasons["after"] == "skipped: first did not pass"
    assert reasons["disk"].startswith("skipped: not enough disk: needs 1000001.0 GB")
    assert not list(tmp_path.glob("*.log"))  # none of them ran


def test_peak_memory_is_printed_when_the_run_ends_even_through_os_exit(tmp_path):
    """The recipes end with os._exit, which skips atexit: the probe reports before it."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch
        torch.cuda.is_initialized = lambda: True  # as after a GPU run
        torch.cuda.max_memory_allocated = lambda: 61.2e9
        torch.cuda.max_memory_reserved = lambda: 70.4e9
        print("args", sys.argv[1:], flush=True)
        os._exit(0)
    """))
    done = subprocess.run([sys.executable, "-m", "phivision.peak_memory", str(script), "--x", "1"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "RANK": "3"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "args ['--x', '1']" in done.stdout
    assert gpu_check.peak_memory(done.stdout) == (61.2, 70.4)
    assert '"rank": 3' in done.stdout


def test_the_largest_peak_over_the_ranks_is_reported():
    lines = ['peak GPU memory: {"rank": 0, "allocated_gb": 10.0, "reserved_gb": 12.5}',
             'peak GPU memory: {"rank": 1, "allocated_gb": 11.0, "reserved_gb": 12.0}']
    assert gpu_check.peak_memory("\n".join(lines)) == (11.0, 12.5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_the_whole_plan_runs_on_cpu_on_the_tiny_checkpoint(tmp_path):
    """`gpu_check --device cpu --size tiny`: every check that can run on one CPU process passes; ZeRO-3 and
    FSDP2 (more than one GPU) are skipped. About 90 s alone on 2 cores."""
    out, workdir = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "phivision.gpu_check", "--device", "cpu", "--size", "tiny",
                           "--budget", "900", "--out", str(out), "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((out / "results.json").read_text())
    checks = results["checks"]
    assert done.returncode == 0, {name: r["error"] for name, r in checks.items()}
    assert list(checks) == ORDER
    assert {name: r["status"] for name, r in checks.items()} == {
        **{name: "pass" for name in ORDER[:6]}, "zero3": "skipped", "fsdp2": "skipped"}
    assert checks["zero3"]["reason"] == "needs 2+ GPUs, 0 here"
    for name in ORDER[:5]:  # the recipe runs: speed and the loss of their first and last step
        assert checks[name]["samples_per_second"] > 0
        assert checks[name]["loss_first"] > 0 and checks[name]["loss_last"] > 0
        assert checks[name]["peak_gpu_allocated_gb"] is None  # no GPU here
    rows = checks["bench"]["rows"]
    assert rows and all(row["mfu"] is not None for row in rows if "error" not in row)
    assert checks["bench"]["mfu"] == max(row["mfu"] for row in rows if row.get("mfu") is not None)
    assert len(list(out.iterdir())) <= gpu_check.MAX_FILES
    assert "Resuming from" in (out / "lora.log").read_text()
    assert not (workdir / "runs").exists()  # every run folder removed
    assert (workdir / "tiny-random" / "config.json").is_file()  # kept for the next run
    prepared = (out / "prepare.log").read_text()
    assert "-m phivision.tiny" in prepared  # built in a subprocess
    assert "make_shapes_dataset(" in prepared and "-m phivision.synthetic" not in prepared  # the data in gpu_check
    assert (workdir / "shapes" / "dataset_dict.json").is_file()
    assert results["gpu"] is None and results["prepare"]["status"] == "pass"
    assert results["packages"]["torch"] == torch.__version__ and results["packages"]["deepspeed"]
