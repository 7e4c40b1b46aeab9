"""phivision.training.checkpoints: only complete checkpoints are resumed from; incomplete ones are set aside."""

import json

import pytest

from phivision.training.checkpoints import (COMPLETE_MARKER, CheckpointError, copy_model_files, find_resume_point,
                                        run_is_complete, trained_steps)


def checkpoint(folder, step, complete=True, state=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        (path / COMPLETE_MARKER).write_text("")
    return path


def test_the_newest_complete_checkpoint_is_resumed_and_newer_incomplete_ones_set_aside(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 6, complete=False)  # killed while writing it
    checkpoint(tmp_path, 8, complete=False, state=False)
    (tmp_path / "checkpoint-10").write_text("not a folder")
    point = find_resume_point(tmp_path, None, auto_resume=True, main_process=True)
    assert point.checkpoint == tmp_path / "checkpoint-4"
    assert [(a.name, b.name) for a, b in point.set_aside] == [("checkpoint-8", "incomplete-checkpoint-8"),
                                                              ("checkpoint-6", "incomplete-checkpoint-6")]
    assert (tmp_path / "incomplete-checkpoint-6" / "trainer_state.json").is_file()  # kept for the user
    assert not (tmp_path / "checkpoint-6").exists()
    assert trained_steps(point.checkpoint) == 4
    # Set aside again later: a second name, nothing overwritten.
    checkpoint(tmp_path, 6, complete=False)
    point = find_resume_point(tmp_path, None, auto_resume=True, main_process=True)
    assert (tmp_path / "incomplete-checkpoint-6-2").is_dir() and point.checkpoint.name == "checkpoint-4"


def test_no_checkpoint_or_no_auto_resume_starts_from_the_beginning(tmp_path):
    assert find_resume_point(tmp_path / "new", None, True, True).checkpoint is None
    checkpoint(tmp_path, 2)
    assert find_resume_point(tmp_path, None, auto_resume=False, main_process=True).checkpoint is None
    checkpoint(tmp_path, 4, complete=False)
    point = find_resume_point(tmp_path, None, auto_resume=True, main_process=False)  # another process: no renames
    assert point.checkpoint.name == "checkpoint-2" and (tmp_path / "checkpoint-4").is_dir()


def test_an_explicit_checkpoint_must_be_complete(tmp_path):
    good = checkpoint(tmp_path, 2)
    bad = checkpoint(tmp_path, 4, complete=False)
    assert find_resume_point(tmp_path, str(good), True, True).checkpoint == good
    with pytest.raises(CheckpointError, match=r"checkpoint-4: incomplete .* the newest complete one there is .*checkpoint-2"):
        find_resume_point(tmp_path, str(bad), True, True)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        find_resume_point(tmp_path, str(tmp_path), True, True)


def test_final_model_files_are_copied_and_a_run_is_complete_once_eval_after_is_written(tmp_path):
    source = checkpoint(tmp_path, 3)
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng_state.pth"):
        (source / name).write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    assert copy_model_files(source, out) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not run_is_complete(out)
    (out / "eval_after.json").write_text("{}")
    assert run_is_complete(out)
