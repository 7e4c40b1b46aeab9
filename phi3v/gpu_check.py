"""GPU acceptance: run this first on a GPU machine. No network needed.

    python -m phi3v.gpu_check                 # or: make gpu-check
    python -m phi3v.gpu_check --dry-run       # what it would run, with every command's flags checked (any machine)

It says which optional packages are there (flash-attn, bitsandbytes, deepspeed), writes a full-size
random Phi-3.5-vision checkpoint (bf16, the Hub's config) and a small generated dataset, then runs each
recipe mode for a few steps under torchrun (NCCL): full fine-tuning under ZeRO-2 in bf16 and in fp16,
under ZeRO-3 and under FSDP2, frozen vision, LoRA, QLoRA, with flash attention where it runs and SDPA otherwise, packing, the
evaluations before and after, saving, and a resume; then the bench's full-size rows with MFU and its
same-work speed-ups at the full-CLIP size. It ends
with a pass/fail table (exit status 1 when a check failed). Checks whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "finetune_hf_trainer_hateful_memes.py"
BENCH = [sys.executable, "-m", "phi3v.bench"]
OPTIONAL = ("flash_attn", "bitsandbytes", "deepspeed")


@dataclass
class Check:
    name: str
    command: list[str]
    needs: tuple[str, ...] = ()
    timeout: int = 300
    expect: str | None = None  # text the output must contain
    result: str = field(default="not run")


def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def plan(workdir: Path, nproc: int) -> list[Check]:
    """The checks, in order (each recipe run writes its own output folder under `workdir`)."""
    checkpoint, data = workdir / "phi35v-random", workdir / "shapes"
    flash = ["--use_flash_attention"] if available("flash_attn") else []
    attn = ["--attn", "flash_attention_2" if flash else "sdpa"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(RECIPE)]
    common = ["--model_name_or_path", str(checkpoint), "--dataset_name_or_path", str(data), "--max_steps", "3",
              "--save_steps", "2", "--batch_size", str(4 * nproc), "--batch_size_per_gpu", "2", "--num_crops", "4",
              "--max_eval_samples", "8", "--logging_steps", "1", "--no-tqdm"]

    def recipe(name: str, *flags: str, needs: tuple[str, ...] = (), out: str | None = None, expect=None) -> Check:
        folder = workdir / "runs" / (out or name.replace(" ", "-"))
        return Check(name, [*torchrun, *common, "--output_dir", str(folder), *flags], needs, expect=expect)

    return [
        recipe("full ZeRO-2 bf16", "--bf16", *flash, needs=("deepspeed",)),
        recipe("full ZeRO-2 fp16", *flash, needs=("deepspeed",)),
        recipe("frozen vision bf16 packed", "--bf16", "--freeze_vision_model", "--packing", *flash, needs=("deepspeed",)),
        recipe("full ZeRO-3 bf16", "--bf16", "--deepspeed", str(ROOT / "ds_config_zero3.json"), *flash,
               needs=("deepspeed",)),
        recipe("full FSDP2 bf16", "--bf16", "--fsdp", "--fsdp_config", str(ROOT / "fsdp_config.json"), *flash),
        recipe("LoRA bf16 packed", "--bf16", "--use_lora", "--packing", *flash),
        recipe("LoRA resumed", "--bf16", "--use_lora", "--packing", "--max_steps", "4", *flash,
               "--resume_from_checkpoint", str(workdir / "runs" / "LoRA-bf16-packed" / "checkpoint-2"),
               out="LoRA-bf16-packed", expect="Resuming from"),
        recipe("QLoRA bf16", "--bf16", "--use_qlora", *flash, needs=("bitsandbytes",)),
        Check("bench full size", [*BENCH, "--size", "full", "--device", "cuda", "--distribution", "docvqa",
                                  "--modes", "full", "frozen", "lora", "qlora", "--steps", "3", *attn], timeout=600),
        # The same-work speed-ups over the reference at the full-CLIP size (batch 1, NLVR2-like: the smallest).
        Check("bench full-CLIP size", [*BENCH, "--size", "clip", "--device", "cuda", "--distribution", "nlvr2",
                                       "--modes", "full", "frozen", "lora", "--batch_size", "1", "--steps", "10",
                                       "--torch_compile_backend", "inductor", *attn], timeout=600),
    ]


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


def prepare(workdir: Path) -> None:
    """The generated dataset and the full-size random checkpoint (written once, kept in `workdir`)."""
    from .synthetic import make_shapes_dataset
    from .tiny import build_tiny_checkpoint

    if not (workdir / "shapes").exists():
        # Some rows text-only: batches with and without images mix, as in real data (and under ZeRO-3 / FSDP
        # the ranks' collectives must still match).
        make_shapes_dataset(workdir / "shapes", num_train=64, num_eval=500, text_only_every=4)
    if not (workdir / "phi35v-random" / "config.json").exists():
        build_tiny_checkpoint(workdir / "phi35v-random", num_crops=4, full_size=True)


def run_check(check: Check) -> None:
    if missing := [p for p in check.needs if not available(p)]:
        check.result = f"skipped ({', '.join(missing)} missing)"
        return
    start = time.time()
    try:
        done = subprocess.run(check.command, capture_output=True, text=True, timeout=check.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        check.result = f"FAIL: over {check.timeout} s"
        return
    output = done.stdout + done.stderr
    seconds = time.time() - start
    if done.returncode != 0 or (check.expect and check.expect not in output):
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        check.result = f"FAIL ({seconds:.0f} s): {last[0][:150]}"
    else:
        check.result = f"pass ({seconds:.0f} s)"
    if check.name.startswith("bench"):
        print(done.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3v.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Print the checks and check their flags; run nothing.")
    parser.add_argument("--workdir", default="gpu_check", help="Where the checkpoint, data and runs go.")
    args = parser.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count()
    print(f"GPUs: {gpus} ({torch.cuda.get_device_name() if gpus else 'none'}); torch {torch.__version__}")
    print("optional packages: " + ", ".join(f"{p} {'yes' if available(p) else 'no'}" for p in OPTIONAL), flush=True)
    checks = plan(Path(args.workdir).resolve(), max(gpus, 1))
    if args.dry_run:
        problems = 0
        for check in checks:
            problem = check_flags(check)
            problems += problem is not None
            print(f"{check.name}: {problem or 'flags parse'}\n  {shlex.join(check.command)}")
        return 1 if problems else 0
    if not gpus:
        print("error: no CUDA GPU here (use --dry-run to check the plan)", file=sys.stderr)
        return 1
    prepare(Path(args.workdir).resolve())
    for check in checks:
        print(f"running: {check.name}", flush=True)
        run_check(check)
    width = max(len(c.name) for c in checks)
    print("\n" + "\n".join(f"{c.name:<{width}}  {c.result}" for c in checks))
    return 1 if any(c.result.startswith("FAIL") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
