"""Checkpoints that a killed run never leaves half-usable, and the run's place in them.

A checkpoint-N folder counts only once every process has written its part: the last step of a save
is a `checkpoint_complete` file. A folder without it (the run was killed while writing it) is never
resumed from; it is renamed `incomplete-checkpoint-N` and left for the user. A run is complete once
its `eval_after.json` is written (the final model is saved before it).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import SetupError
from .sharding import full_weights

COMPLETE_MARKER = "checkpoint_complete"
FINAL_EVAL = "eval_after.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a final save writes into --output_dir: the model (full or adapter) and its configs.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "adapter_config.json", "adapter_model.safetensors", "README.md")


class CheckpointError(SetupError):
    """A checkpoint that cannot be resumed from (the message names it and says what to do)."""


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def mark_complete(checkpoint: str | Path) -> None:
    (Path(checkpoint) / COMPLETE_MARKER).write_text("every process wrote its part of this checkpoint\n")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders of `output_dir`, newest (largest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def set_aside(checkpoint: Path) -> Path:
    """Renames an incomplete checkpoint out of the way (kept for the user, never resumed from)."""
    target = checkpoint.with_name(f"incomplete-{checkpoint.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"incomplete-{checkpoint.name}-{suffix}")
    checkpoint.rename(target)
    return target


@dataclass
class ResumePoint:
    """Where a run starts: a checkpoint (None: from the beginning), and what was set aside to get there."""

    checkpoint: Path | None
    set_aside: list[tuple[Path, Path]]


def find_resume_point(output_dir: str | Path, resume_from_checkpoint: str | None, auto_resume: bool,
                      main_process: bool) -> ResumePoint:
    """The checkpoint to resume from.

    `resume_from_checkpoint` (a path) must be a complete checkpoint; otherwise, with `auto_resume`,
    the newest complete checkpoint-N of `output_dir`. Incomplete ones newer than it are set aside by
    the main process (the others only skip them). Raises CheckpointError for a bad explicit path.
    """
    if resume_from_checkpoint is not None:
        path = Path(resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no trainer_state.json "
                                  "in it); pass a checkpoint-N folder of an earlier run")
        if not is_complete(path):
            newest = next((c for c in checkpoints(path.parent) if is_complete(c)), None)
            hint = f"; the newest complete one there is {newest}" if newest else ""
            raise CheckpointError(f"--resume_from_checkpoint {path}: incomplete (the run was stopped while writing it)"
                                  f"{hint}")
        return ResumePoint(path, [])
    if not auto_resume:
        return ResumePoint(None, [])
    moved = []
    for checkpoint in checkpoints(output_dir):
        if is_complete(checkpoint):
            return ResumePoint(checkpoint, moved)
        moved.append((checkpoint, set_aside(checkpoint) if main_process else checkpoint))
    return ResumePoint(None, moved)


def trained_steps(checkpoint: str | Path) -> int:
    """The optimizer steps a checkpoint holds."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def log_history(checkpoint: str | Path) -> list[dict]:
    """What the run logged (losses, learning rates, evaluations) up to a checkpoint."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]


def copy_model_files(checkpoint: str | Path, output_dir: str | Path) -> list[str]:
    """Copies the model (full weights or adapter) of a checkpoint into `output_dir`, as a final save writes it."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    names = [p.name for p in checkpoint.iterdir()
             if p.name in MODEL_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name)]
    for name in names:
        shutil.copy2(checkpoint / name, output_dir / name)
    return sorted(names)


def run_is_complete(output_dir: str | Path) -> bool:
    return (Path(output_dir) / FINAL_EVAL).is_file()


def load_model_weights(model, checkpoint: str | Path) -> None:
    """Loads a checkpoint's trained weights (the LoRA adapter, or the full model) into `model`, as set up for its mode."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {name: tensor for file in files for name, tensor in load_file(checkpoint / file).items()}
    with full_weights(model, modify=True):  # ZeRO-3: into whole weights, partitioned again after
        missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [name for name in missing if name in dict(model.named_parameters())]:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
