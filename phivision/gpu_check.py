"""GPU acceptance: run this first on a GPU machine. No network needed.

    python -m phivision.gpu_check --budget 540 --out DIR    # or: make gpu-check
    python -m phivision.gpu_check --dry-run                 # the checks, their commands and disk (any machine)
    python -m phivision.gpu_check --device cpu --size tiny  # the same plan on a tiny checkpoint on CPU (the suite runs it)
    python -m phivision.gpu_check --family phi4mm --budget 540 --out DIR   # Phi-4-multimodal's plan: a second run

It writes a random checkpoint (full size: Phi-3.5-vision's config, bf16, built in a subprocess) and a small
generated dataset into --workdir, then runs the checks in this order, most telling first, until --budget
seconds are spent (the rest: "not run: budget"):

    full-zero2     full fine-tuning under DeepSpeed ZeRO-2 in bf16, with the evaluations before and after
    lora-packed    LoRA with packing; saves checkpoint-2 (the plan's only checkpoint)
    lora-resumed   resumes lora-packed's checkpoint-2 and trains step 3
    qlora          QLoRA (4-bit NF4 base, needs bitsandbytes)
    frozen-cached  frozen vision tower with cached image features
    bench          the bench's rows with MFU and HFU
    zero3, fsdp2   full fine-tuning sharded by ZeRO-3 and by FSDP2 (only with more than one GPU)

Each recipe check trains 3 steps under torchrun and saves nothing but its final model; its folder is removed
after it. Before a check the free disk is checked; a check past its timeout is killed with all its processes
(torchrun's workers, in their own sessions, included). --out gets at most 8 files: prepare.log, one log per
check (lora-* share lora.log, zero3/fsdp2 share sharded.log) and results.json: per check pass/fail, seconds,
samples/s, peak GPU memory (allocated and reserved) beside what the meta-device sizing expected of the step
(--gradient_checkpointing auto's plan, on a GPU), MFU and HFU (bench), the loss at the first and last step
and, for a failure, the failing worker's error line. Exit status 1 when a check failed.

--family phi4mm: the same for Phi-4-multimodal (its full-size checkpoint: 4.74B parameters from
phivision/configs/ plus its vision-lora/ and speech-lora/ adapters at their real ranks, 11 GB in bf16), with
Microsoft's recipe (--continue_vision_lora) as the second check: continue-vision-lora. The recipes refuse
frozen-cached, zero3 and fsdp2 for Phi-4-MM, so its plan leaves them out (--dry-run says why).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "finetune_hf_trainer_hateful_memes.py"
PYTHON = sys.executable
# Recipes and the bench run under phivision.peak_memory, which prints each process's peak GPU memory at the end.
PROBE = [PYTHON, "-m", "phivision.peak_memory"]
BENCH = [*PROBE, "-m", "phivision.bench"]
MAX_FILES = 8  # what comes back from a run on the first GPU machine
NUM_TRAIN = 64  # generated training rows (the recipe holds out the first 500 for evaluation)
GB = 1e9
DISK_MARGIN = 1 * GB  # logs, eval files, DeepSpeed's JIT cache


@dataclass
class Check:
    """One check: a command, what it needs, and what it may cost."""

    name: str
    command: list[str]
    log: str  # file stem in --out; checks may share one (MAX_FILES)
    disk: float = 0.0  # bytes its run folder may hold at most
    timeout: float = 300.0
    min_seconds: float = 60.0  # not started with less budget left
    needs: tuple[str, ...] = ()  # Python packages
    min_gpus: int = 0
    expect: str | None = None  # text the output must contain
    run_dir: Path | None = None  # removed after the check (unless `keep_run_dir`)
    keep_run_dir: bool = False  # a later check continues from it (and removes it)
    after: str | None = None  # the check it continues: not run unless that one passed


@dataclass
class Result:
    """What results.json says of one check."""

    status: str  # pass | fail | skipped | not run | stopped (at the end of the budget)
    reason: str | None = None  # why skipped / not run / stopped
    seconds: float | None = None
    samples_per_second: float | None = None
    peak_gpu_allocated_gb: float | None = None
    peak_gpu_reserved_gb: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    error: str | None = None  # a failure's error line
    rows: list[dict] | None = None  # the bench's rows
    # What --gradient_checkpointing auto's meta-device plan (phivision.training.sizing) expected the step to hold
    # per GPU (weights, gradients, optimizer states, activations: GB), and the allocated peak over it.
    sizing_gb: float | None = None
    peak_over_sizing: float | None = None

    def summary(self) -> str:
        """One line: the status, the seconds and the error or reason."""
        if self.status in ("pass", "fail", "stopped"):
            seconds = f" ({self.seconds:.0f} s)" if self.seconds is not None else ""
            detail = self.error or self.reason
            return f"{self.status}{seconds}" + (f": {detail}" if detail else "")
        return f"{self.status}: {self.reason}"


@dataclass
class Setup:
    """Where and at what size the plan runs."""

    device: str  # cuda | cpu
    size: str  # full | tiny
    workdir: Path
    gpus: int
    flash: bool = False
    env: dict[str, str] = field(default_factory=dict)
    family: str = "phi3v"  # phi3v | phi4mm (as phivision.bench's and phivision.tiny's --family)

    @property
    def nproc(self) -> int:
        return max(self.gpus, 1)

    @property
    def checkpoint(self) -> Path:
        if self.family == "phi4mm":
            return self.workdir / ("phi4mm-random" if self.size == "full" else "tiny-phi4mm-random")
        return self.workdir / ("phi35v-random" if self.size == "full" else "tiny-random")

    @property
    def data(self) -> Path:
        return self.workdir / "shapes"

    @property
    def num_crops(self) -> int:
        return 4 if self.size == "full" else 1


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ModelSizes:
    """What the disk estimates are made of, counted on the meta device (nothing allocated)."""

    parameters: int  # of the whole model as a full run saves it (Phi-4-MM: its speech encoder put back)
    lora_parameters: int  # trainable under --use_lora (the recipes' defaults)
    hidden_size: int
    adapter_parameters: int = 0  # the adapters the checkpoint ships (Phi-4-MM: vision-lora/ and speech-lora/)


@functools.cache
def model_sizes(size: str, family: str = "phi3v") -> ModelSizes:
    """The sizes of `family`'s random checkpoint of `size` (the bench's config of that size)."""
    import torch

    from .bench import make_config
    from .families import family_for_type
    from .training.sizing import meta_model, mode_arguments, parameter_counts

    config = make_config(size, family)
    with torch.device("meta"):
        model = family_for_type(config.model_type, "--family").model_class()(config)
    lora = parameter_counts(meta_model(config, *mode_arguments("lora"), checkpointing=False))[1]
    adapters = 0
    if family == "phi4mm":
        from .phi4mm.tiny import adapter_shapes

        adapters = sum(a * b for shapes in adapter_shapes(model).values() for a, b in shapes.values())
    return ModelSizes(sum(p.numel() for p in model.parameters()), lora, config.hidden_size, adapters)


def refused_checks(family: str) -> dict[str, str]:
    """The checks the recipes refuse for `family` (each with why, as the recipes say it), left out of its plan."""
    from .bench import FAMILIES
    from .families import known_families

    model = known_families()[FAMILIES[family]]
    refused = {}
    if not model.supports_vision_cache:
        refused["frozen-cached"] = f"{model.name} has no --cache_vision_features"
    if not model.supports_sharded_weights:
        refused["zero3"] = refused["fsdp2"] = f"{model.name} cannot train with partitioned weights"
    return refused


def plan(setup: Setup) -> list[Check]:
    """The checks, in order; each recipe run writes its own folder under workdir/runs. Those the recipes refuse
    for the family (`refused_checks`) are left out."""
    sizes = model_sizes(setup.size, setup.family)
    bf16_model, fp32_model, lora = 2 * sizes.parameters, 4 * sizes.parameters, sizes.lora_parameters
    # LoRA's checkpoint: the fp32 adapters, Adam's two moments; then the final adapters beside it.
    lora_run = 4 * lora + 8 * lora + 4 * lora
    # --cache_vision_features: one 16-bit feature map per training image (at most num_crops + 1 crops of 144).
    cache = NUM_TRAIN * (setup.num_crops + 1) * 145 * sizes.hidden_size * 2
    runs = setup.workdir / "runs"
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={setup.nproc}",
                "-m", "phivision.peak_memory", str(RECIPE)]
    common = ["--model_name_or_path", str(setup.checkpoint), "--dataset_name_or_path", str(setup.data),
              "--batch_size", str(4 * setup.nproc), "--batch_size_per_gpu", "2", "--num_crops", str(setup.num_crops),
              "--max_eval_samples", "8", "--max_new_tokens", "8", "--logging_steps", "1", "--no-tqdm"]
    if setup.device == "cuda":
        # Not on CPU: the CPU plan checks the plan itself, and bf16 matmuls run about 8x slower on CPUs without
        # avx512_bf16 (the recipes' bf16 on CPU has its own test).
        common.append("--bf16")
    if setup.flash:
        common.append("--use_flash_attention")
    if setup.device == "cpu":
        common += ["--dataloader_num_workers", "0"]
    # Only lora-packed saves a checkpoint: with save_strategy steps the Trainer also saves at the last step,
    # which at full size is 66 GB per full run (16-bit model, fp32 master weights, Adam's moments).
    no_checkpoint = ["--max_steps", "3", "--save_strategy", "no", "--skip_eval_before"]

    def recipe(name: str, *flags: str, log: str | None = None, disk: float = bf16_model, folder: str | None = None,
               **options) -> Check:
        run_dir = runs / (folder or name)
        return Check(name, [*torchrun, *common, "--output_dir", str(run_dir), *flags], log or name, disk=disk,
                     run_dir=run_dir, **options)

    # Phi-4-MM: Microsoft's recipe trains the shipped vision LoRA under ZeRO-2 and saves a full model, merged.
    vision_lora = [recipe("continue-vision-lora", "--continue_vision_lora", *no_checkpoint, needs=("deepspeed",))]
    checks = [
        recipe("full-zero2", "--max_steps", "3", "--save_strategy", "no", needs=("deepspeed",)),
        *(vision_lora if setup.family == "phi4mm" else []),
        recipe("lora-packed", "--use_lora", "--packing", "--max_steps", "2", "--save_steps", "2", "--skip_eval_before",
               log="lora", disk=lora_run, keep_run_dir=True),
        recipe("lora-resumed", "--use_lora", "--packing", *no_checkpoint, "--resume_from_checkpoint",
               str(runs / "lora-packed" / "checkpoint-2"), log="lora", disk=4 * lora, folder="lora-packed",
               expect="Resuming from", after="lora-packed"),
        recipe("qlora", "--use_qlora", *no_checkpoint, disk=4 * lora, needs=("bitsandbytes",)),
        recipe("frozen-cached", "--freeze_vision_model", "--cache_vision_features", *no_checkpoint,
               disk=bf16_model + cache, needs=("deepspeed",)),
        bench_check(setup, runs / "bench"),
        recipe("zero3", "--deepspeed", str(ROOT / "ds_config_zero3.json"), *no_checkpoint, log="sharded",
               needs=("deepspeed",), min_gpus=2),
        # FSDP2 keeps fp32 weights: its final model is saved in fp32.
        recipe("fsdp2", "--fsdp", "--fsdp_config", str(ROOT / "fsdp_config.json"), *no_checkpoint, log="sharded",
               disk=fp32_model, min_gpus=2),
    ]
    refused = refused_checks(setup.family)
    return [check for check in checks if check.name not in refused]


def bench_check(setup: Setup, run_dir: Path) -> Check:
    """The bench's rows with MFU/HFU; at full size on the GPU, a few tiny rows on CPU."""
    json_file = ["--family", setup.family, "--json", str(run_dir / "bench.json")]
    if setup.device == "cpu":
        # An assumed 1 TFLOP/s peak so that the CPU run reports (meaningless) MFU through the same path.
        flags = ["--size", "tiny", "--device", "cpu", "--distribution", "nlvr2", "--modes", "lora", "--batch_size", "1",
                 "--steps", "1", "--num_samples", "8", "--no_baseline", "--peak_tflops", "1"]
    else:
        flags = ["--size", "full", "--device", "cuda", "--distribution", "docvqa", "--modes", "full", "lora",
                 # Every row times --steps x --batch_size samples, and steps each timed batch once more for its FLOPs.
                 "--batch_size", "2", "--steps", "2", "--attn", "flash_attention_2" if setup.flash else "sdpa"]
    return Check("bench", [*BENCH, *flags, *json_file], "bench", run_dir=run_dir)


def check_flags(check: Check) -> str | None:
    """Why a recipe's or the bench's command flags would not parse (None when they do); nothing is run."""
    if str(RECIPE) in check.command:
        from .training.arguments import build_parser

        argv = check.command[check.command.index(str(RECIPE)) + 1:]
    elif check.command[: len(BENCH)] == BENCH:
        from .bench import build_parser

        argv = check.command[len(BENCH):]
    else:
        return None
    try:
        _, unknown = build_parser().parse_known_args(argv)
    except SystemExit:  # a bad value: argparse has said which on stderr
        return "a flag's value does not parse"
    return f"unknown flags {unknown}" if unknown else None


def base_disk(setup: Setup) -> float:
    """Bytes of what prepare() writes: the random checkpoint (16-bit, with its adapters) and the generated dataset."""
    sizes = model_sizes(setup.size, setup.family)
    return 2 * (sizes.parameters + sizes.adapter_parameters) + 0.1 * GB


def peak_disk(setup: Setup, checks: list[Check]) -> float:
    """The most disk the plan holds at once: the base, plus the folders kept from earlier checks and the current one."""
    kept, peak = {}, 0.0
    for check in checks:
        held = dict(kept)
        if check.run_dir is not None:
            held[check.run_dir] = held.get(check.run_dir, 0.0) + check.disk
        peak = max(peak, sum(held.values()))
        kept = held if check.keep_run_dir else {d: b for d, b in held.items() if d != check.run_dir}
    return base_disk(setup) + peak


def log_names(checks: list[Check]) -> list[str]:
    """The files a run writes in --out: prepare.log, one log per `Check.log`, results.json."""
    return ["prepare.log", *dict.fromkeys(f"{c.log}.log" for c in checks), "results.json"]


# ----------------------------------------------------------------------------------------- running a command


def become_subreaper() -> None:
    """Orphans of our children (a worker whose torchrun died) become our children, so none escapes the sweep."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (Linux)


def kill_tree(root: psutil.Process) -> list[int]:
    """SIGKILLs `root` and every descendant, those in sessions of their own too (torchrun starts its workers with
    start_new_session, so its process group is not enough). All are stopped first so that none can start another
    while the tree is walked. Returns the pids still alive afterwards (none expected; zombies count as gone)."""
    stopped: dict[int, psutil.Process] = {}
    while True:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        new = [p for p in family if p.pid not in stopped]
        if not new:
            break
        for process in new:
            with contextlib.suppress(psutil.Error):
                process.suspend()
            stopped[process.pid] = process
    for process in stopped.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    _, alive = psutil.wait_procs(list(stopped.values()), timeout=10)
    return [p.pid for p in alive if alive_not_zombie(p)]


def alive_not_zombie(process: psutil.Process) -> bool:
    """Whether the process still runs (a zombie has ended: only its exit status is left to collect)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sweep_children(keep: set[int]) -> list[int]:
    """Kills whatever a check left behind among our children (with become_subreaper: orphans too), except the
    pids in `keep` (children we had before the plan)."""
    left = []
    for child in psutil.Process().children():
        if child.pid not in keep:
            left += kill_tree(child)
    return left


@dataclass
class Run:
    """One command's end: its exit status (None: killed at its timeout), output and seconds."""

    returncode: int | None
    output: str
    seconds: float
    survivors: list[int] = field(default_factory=list)


def run_command(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> Run:
    """Runs `command` in a session of its own with its output appended to `log`; past `timeout` seconds, or when
    gpu_check itself is interrupted (Ctrl-C, SIGTERM), it is killed with all its processes."""
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(command)}\n")
        f.flush()
        start_offset = f.tell()
        start = time.monotonic()
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            returncode, survivors = process.wait(timeout=timeout), []
        except subprocess.TimeoutExpired:
            returncode, survivors = None, kill_command(process)
        except BaseException:  # its processes, in sessions of their own, would not get our signal
            kill_command(process)
            raise
        seconds = time.monotonic() - start
    with log.open() as f:
        f.seek(start_offset)
        output = f.read()
    if returncode is None:
        with log.open("a") as f:
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s with all its processes\n")
    return Run(returncode, output, seconds, survivors)


def kill_command(process: subprocess.Popen) -> list[int]:
    """Kills a command started by run_command with all its processes; the pids still alive (none expected)."""
    try:
        survivors = kill_tree(psutil.Process(process.pid))
    except psutil.NoSuchProcess:  # it ended just now
        survivors = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything of its group that left the tree
    process.wait()
    return survivors


# ------------------------------------------------------------------------------------------ reading the output

# A line naming an exception: "ValueError: ...", "torch.OutOfMemoryError: ...", the recipes' "error: ...",
# possibly behind torchrun's "[rank0]: " prefix.
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b.*"
                        r"|error: .*)$")
# torchrun's own summary of failed workers, which names the launcher's exception, not the worker's.
LAUNCHER = ("ChildFailedError",)


def error_line(output: str) -> str | None:
    """The failing worker's error line: the last line that names an exception (not torchrun's border or its
    ChildFailedError), else the last line that is not a border."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        match = ERROR_LINE.match(line)
        if match and not any(name in line for name in LAUNCHER):
            return match.group(1)[:300]
    for line in reversed(lines):
        if not re.fullmatch(r"[=\-]+", line) and not line.startswith("[gpu_check]"):
            return line[:300]
    return None


def trainer_logs(output: str) -> list[dict]:
    """The dicts the Trainer prints (with --no-tqdm: one per logging step, then the run's summary)."""
    logs = []
    for line in output.splitlines():
        start, end = line.find("{'"), line.rfind("}")
        if start < 0 or end < start:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(line[start:end + 1])
            if isinstance(value, dict):
                logs.append(value)
    return logs


def number(value) -> float | None:
    """A logged value as a float (the Trainer prints them as strings), None when it is not a number."""
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    return None


def peak_memory(output: str) -> tuple[float | None, float | None]:
    """(allocated, reserved) GB: the largest peaks over the processes (phivision.peak_memory's lines)."""
    from .peak_memory import MARKER

    peaks = []
    for line in output.splitlines():
        if MARKER in line:
            with contextlib.suppress(ValueError):
                peaks.append(json.loads(line.split(MARKER, 1)[1]))
    if not peaks:
        return None, None
    return max(p["allocated_gb"] for p in peaks), max(p["reserved_gb"] for p in peaks)


# What --gradient_checkpointing auto prints of its plan (phivision.training.checkpointing.CheckpointingPlan.describe):
# the GB per GPU the meta-device sizing expects the step to need.
SIZING_LINE = re.compile(r"Gradient checkpointing auto: checkpointing .*: ([\d.e+]+) GB of ")


def sizing_gb(output: str) -> float | None:
    """The GB per GPU the run's meta-device sizing expected (its last plan), None when it printed none (on CPU
    without a budget, or with checkpointing not auto)."""
    found = SIZING_LINE.findall(output)
    return float(found[-1]) if found else None


BENCH_KEYS = ("config", "distribution", "samples_per_s", "peak_allocated_gb", "peak_reserved_gb", "mfu", "hfu",
              "vs baseline", "error")


def bench_rows(path: Path) -> list[dict]:
    """The bench's rows (its --json), with the keys results.json keeps; [] when it wrote none."""
    if not path.is_file():
        return []
    return [{k: row[k] for k in BENCH_KEYS if k in row} for row in json.loads(path.read_text())]


def measure(check: Check, run: Run) -> Result:
    """A finished (or killed) command's Result."""
    result = Result("pass", seconds=round(run.seconds, 1))
    logs = trainer_logs(run.output)
    losses = [number(entry["loss"]) for entry in logs if "loss" in entry]
    if losses:
        result.loss_first, result.loss_last = losses[0], losses[-1]
    speeds = [number(entry["train_samples_per_second"]) for entry in logs if "train_samples_per_second" in entry]
    result.samples_per_second = speeds[-1] if speeds else None
    result.peak_gpu_allocated_gb, result.peak_gpu_reserved_gb = peak_memory(run.output)
    result.sizing_gb = sizing_gb(run.output)
    if result.sizing_gb and result.peak_gpu_allocated_gb is not None:
        result.peak_over_sizing = round(result.peak_gpu_allocated_gb / result.sizing_gb, 2)
    if check.name == "bench" and check.run_dir is not None:
        result.rows = bench_rows(check.run_dir / "bench.json")
        best = max((r for r in result.rows if r.get("mfu") is not None), key=lambda r: r["mfu"], default=None)
        if best is not None:  # the best row's figures; every row is in `rows`
            result.mfu, result.hfu, result.samples_per_second = best["mfu"], best["hfu"], best["samples_per_s"]
    if run.returncode is None:
        result.status, result.error = "fail", f"over its {check.timeout:.0f} s: killed with all its processes"
    elif run.returncode != 0:
        result.status, result.error = "fail", error_line(run.output) or f"exit status {run.returncode}"
    elif check.expect and check.expect not in run.output:
        result.status, result.error = "fail", f"the output lacks {check.expect!r}"
    if run.survivors:
        result.status = "fail"
        result.error = f"{result.error or 'finished'}; processes left after killing: {run.survivors}"
    return result


# ------------------------------------------------------------------------------------------- the run itself


def available(package: str) -> bool:
    """Whether `package` can be imported here."""
    return importlib.util.find_spec(package) is not None


PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "deepspeed", "bitsandbytes", "flash_attn")


def package_versions() -> dict[str, str | None]:
    """The installed version of each package the checks depend on (None: missing)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def gpu_name() -> str | None:
    """The first GPU's name, asked in a subprocess: in this process CUDA would keep a context (and memory)
    on the GPU for the whole run."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([PYTHON, "-c", "import torch; print(torch.cuda.get_device_name())"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return done.stdout.strip() or None
    return None


def why_not(check: Check, setup: Setup, results: dict[str, Result]) -> Result | None:
    """A skipped Result when the check cannot run here, None when it can."""
    if missing := [p for p in check.needs if not available(p)]:
        return Result("skipped", f"{', '.join(missing)} missing")
    if check.min_gpus and setup.gpus < check.min_gpus:
        return Result("skipped", f"needs {check.min_gpus}+ GPUs, {setup.gpus} here")
    if check.after and (before := results.get(check.after)) is not None and before.status != "pass":
        return Result("skipped", f"{check.after} did not pass")
    return None


def free_disk(path: Path) -> float:
    """Free bytes on the disk that holds `path` (created if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def run_check(check: Check, setup: Setup, out: Path, deadline: float, results: dict[str, Result]) -> Result:
    """Runs one check within the budget left, or says why it did not run."""
    if (skipped := why_not(check, setup, results)) is not None:
        return skipped
    left = deadline - time.monotonic()
    if left < check.min_seconds:
        return Result("not run", "budget")
    if (free := free_disk(setup.workdir)) < check.disk + DISK_MARGIN:
        return Result("skipped", f"not enough disk: needs {(check.disk + DISK_MARGIN) / GB:.1f} GB, "
                                 f"{free / GB:.1f} GB free")
    timeout = min(check.timeout, left)
    if check.run_dir is not None:
        check.run_dir.mkdir(parents=True, exist_ok=True)
    run = run_command(check.command, out / f"{check.log}.log", timeout, setup.env)
    result = measure(check, run)
    if run.returncode is None and timeout < check.timeout:
        result.status, result.reason, result.error = "stopped", "budget", None
    if check.run_dir is not None and not check.keep_run_dir:
        shutil.rmtree(check.run_dir, ignore_errors=True)
    return result


def prepare(setup: Setup, log: Path, deadline: float) -> Result:
    """The generated dataset (written here) and the random checkpoint (written by a subprocess, so that no GPU memory
    stays held here), kept in the workdir for the next run; a folder appears only once complete."""
    start = time.monotonic()
    missing = [folder for folder in (setup.data, setup.checkpoint) if not folder.is_dir()]
    if missing and (free := free_disk(setup.workdir)) < base_disk(setup) + DISK_MARGIN:
        return Result("fail", error=f"not enough disk for the checkpoint and data: needs "
                                    f"{(base_disk(setup) + DISK_MARGIN) / GB:.1f} GB, {free / GB:.1f} GB free")
    if setup.data in missing:
        # In this process, which has the libraries it needs loaded already (planning did): about a second, where a
        # subprocess spends several importing them.
        import datasets

        from .synthetic import make_shapes_dataset

        datasets.disable_progress_bars()  # the log says what was written
        partial = setup.data.with_name(setup.data.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with log.open("a") as f:
            f.write(f"\n$ make_shapes_dataset({str(partial)!r}, num_train={NUM_TRAIN}, num_eval=500, "
                    "text_only_every=4)\n")
            try:
                make_shapes_dataset(partial, num_train=NUM_TRAIN, num_eval=500, text_only_every=4)
            except Exception as e:  # noqa: BLE001 - whatever failed is the error line in results.json
                shutil.rmtree(partial, ignore_errors=True)
                f.write(f"{type(e).__name__}: {e}\n")
                return Result("fail", seconds=round(time.monotonic() - start, 1), error=f"{type(e).__name__}: {e}")
            f.write(f"Wrote 500 eval + {NUM_TRAIN} train rows to {partial}\n")
        partial.rename(setup.data)
    if setup.checkpoint in missing:
        size = ["--full_size"] if setup.size == "full" else []
        partial = setup.checkpoint.with_name(setup.checkpoint.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        command = [PYTHON, "-m", "phivision.tiny", "--family", setup.family, "--num_crops", str(setup.num_crops),
                   *size, str(partial)]
        run = run_command(command, log, max(deadline - time.monotonic(), 1), setup.env)
        if run.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            error = error_line(run.output) if run.returncode is not None else "over the budget"
            return Result("fail", seconds=round(time.monotonic() - start, 1), error=error)
        partial.rename(setup.checkpoint)
    return Result("pass", seconds=round(time.monotonic() - start, 1))


def write_results(out: Path, header: dict, prepared: Result | None, results: dict[str, Result]) -> None:
    """out/results.json: the run's header (device, GPU, package versions, budget), prepare's and each check's Result."""
    body = {**header, "prepare": asdict(prepared) if prepared else None,
            "checks": {name: asdict(result) for name, result in results.items()}}
    (out / "results.json").write_text(json.dumps(body, indent=2) + "\n")


def run_plan(setup: Setup, checks: list[Check], out: Path, deadline: float, header: dict) -> dict[str, Result]:
    """Prepares, then runs the checks in order until `deadline` (time.monotonic()); results.json is rewritten after
    each."""
    out.mkdir(parents=True, exist_ok=True)
    for name in log_names(checks):  # a previous run's files: the folder never holds more than MAX_FILES of ours
        (out / name).unlink(missing_ok=True)
    results: dict[str, Result] = {}
    ours = {child.pid for child in psutil.Process().children()}
    prepared = prepare(setup, out / "prepare.log", deadline)
    for check in checks:
        if prepared.status != "pass":
            results[check.name] = Result("not run", "the checkpoint or data could not be written")
            continue
        print(f"running: {check.name}", flush=True)
        results[check.name] = result = run_check(check, setup, out, deadline, results)
        if left := sweep_children(ours):
            result.status, result.error = "fail", f"{result.error or ''} processes left: {left}".strip()
        print(f"  {result.summary()}", flush=True)
        write_results(out, header, prepared, results)
    shutil.rmtree(setup.workdir / "runs", ignore_errors=True)
    write_results(out, header, prepared, results)
    return results


def print_plan(setup: Setup, checks: list[Check]) -> int:
    """The dry run: each check with its command and disk, whether its flags parse, and the plan's peak disk."""
    problems = 0
    for check in checks:
        problem = check_flags(check)
        problems += problem is not None
        where = f"; needs {check.min_gpus}+ GPUs" if check.min_gpus else ""
        print(f"{check.name}: {problem or 'flags parse'}; disk {check.disk / GB:.1f} GB{where}\n"
              f"  {shlex.join(check.command)}")
    if refused := refused_checks(setup.family):
        reasons = {}
        for name, reason in refused.items():
            reasons.setdefault(reason, []).append(name)
        print("not in the plan, refused by the recipes: " + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in reasons.items()))
    print(f"checkpoint and data: {base_disk(setup) / GB:.1f} GB")
    print(f"peak disk: {peak_disk(setup, checks) / GB:.0f} GB")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    """gpu_check's command line."""
    parser = argparse.ArgumentParser(prog="python -m phivision.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=540,
                        help="Seconds for everything, preparing included; checks that do not fit are 'not run'.")
    parser.add_argument("--out", default="gpu_check_results", help="Where the logs and results.json go (≤ 8 files).")
    parser.add_argument("--workdir", default="gpu_check", help="Where the checkpoint, data and run folders go.")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default) or cpu (one process, for testing the plan).")
    parser.add_argument("--family", choices=["phi3v", "phi4mm"], default="phi3v",
                        help="The model family: phi3v (Phi-3.5-vision, default) or phi4mm (Phi-4-multimodal: its own "
                             "plan and checkpoint, a second run).")
    parser.add_argument("--size", choices=["full", "tiny"], default=None,
                        help="The random checkpoint: full (the family's Hub config; default on cuda) or tiny.")
    parser.add_argument("--checks", nargs="+", default=None,
                        help="Run only these checks (names as in --dry-run), e.g. --checks qlora.")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print the checks with their commands and disk, check their flags; run nothing.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs (or with --dry-run prints) the plan; the exit status is 1 when a check failed."""
    started = time.monotonic()  # the budget covers everything, planning included
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be positive")

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device
    size = args.size or ("full" if device == "cuda" else "tiny")
    setup = Setup(device, size, Path(args.workdir).resolve(), gpus if device == "cuda" else 0,
                  flash=device == "cuda" and available("flash_attn"),
                  env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "TMPDIR": str(Path(args.workdir).resolve() / "tmp")}, family=args.family)
    if device == "cuda" and not gpus and not args.dry_run:
        parser.exit(1, "error: no CUDA GPU here (--device cpu --size tiny runs the plan on CPU; --dry-run prints it)\n")
    checks = plan(setup)
    if args.checks:
        if unknown := sorted(set(args.checks) - {c.name for c in checks}):
            parser.error(f"--checks: unknown {', '.join(unknown)} (one of {', '.join(c.name for c in checks)})")
        checks = [c for c in checks if c.name in args.checks]
    assert len(log_names(checks)) <= MAX_FILES
    name = gpu_name() if gpus else None
    print(f"GPUs: {gpus} ({name or 'none'}); torch {torch.__version__}; device {device}, size {size}, "
          f"family {args.family}")
    versions = package_versions()
    print("packages: " + ", ".join(f"{p} {v or 'missing'}" for p, v in versions.items()), flush=True)
    if args.dry_run:
        return print_plan(setup, checks)
    (setup.workdir / "tmp").mkdir(parents=True, exist_ok=True)
    become_subreaper()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the running check is killed too
    header = {"family": args.family, "device": device, "size": size, "gpus": gpus, "gpu": name, "packages": versions,
              "budget_s": args.budget}
    results = run_plan(setup, checks, Path(args.out).resolve(), started + args.budget, header)
    width = max(len(check) for check in results)
    print("\n" + "\n".join(f"{check:<{width}}  {result.summary()}" for check, result in results.items()))
    return 1 if any(r.status == "fail" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
