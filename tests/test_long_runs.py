"""Long runs never lose work, end to end: kills at any moment (checkpoint writes included), preemption,
re-runs of finished runs, seeds, unreadable data met mid-run, and setup mistakes."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from forked import ForkedRun, forked_launch, forked_run
from helpers import random_image
from test_recipes import COMMON, ROOT, forked_recipe, log_losses, run_recipe, weights

from phivision.synthetic import make_shapes_dataset

MEMES = "finetune_hf_trainer_hateful_memes.py"
# Makes every checkpoint's last step slow, so that a kill can land while one is being written.
SLOW_CHECKPOINTS = textwrap.dedent("""
    import os
    if os.environ.get("SLOW_CHECKPOINT_SECONDS"):
        import time
        import phivision.training.trainer as trainer
        mark_complete = trainer.mark_complete
        def slow_mark_complete(path):
            time.sleep(float(os.environ["SLOW_CHECKPOINT_SECONDS"]))
            mark_complete(path)
        trainer.mark_complete = slow_mark_complete
""")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    (folder / "sitecustomize.py").write_text(SLOW_CHECKPOINTS)
    return folder


def command(torchrun: bool, *argv, script: str = MEMES) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [
        sys.executable]
    return [*launcher, str(ROOT / script), *COMMON, *map(str, argv)]


def environment(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def launch(torchrun: bool, *argv, script: str = MEMES, **env) -> subprocess.Popen:
    """A run in its own session, as a job is.

    Its output goes to a file (a pipe nobody reads while the run goes on would fill and stall it).
    """
    log = tempfile.NamedTemporaryFile("w+", prefix="run-", suffix=".log", delete=False)
    process = subprocess.Popen(command(torchrun, *argv, script=script), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env=environment(**env), start_new_session=True)
    process.log = Path(log.name)
    log.close()
    return process


def start(torchrun: bool, *argv, script: str = MEMES, **env) -> ForkedRun:
    """`launch`'s run with its ranks forked from a process that has imported the libraries (tests/forked.py), each
    rank in a session of its own; for the kill tests, whose claims are about what our code leaves on disk."""
    return forked_launch(ROOT / script, [*COMMON, *map(str, argv)], nproc=2 if torchrun else None,
                         env=environment(**env))


def output_of(process: subprocess.Popen) -> str:
    return process.log.read_text(errors="replace")


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(process)
        raise
    return process.returncode, output_of(process)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(process: subprocess.Popen | ForkedRun) -> None:
    """SIGKILL to every process of the run at once: a node lost, an OOM killer, `kill -9`."""
    if isinstance(process, ForkedRun):  # each rank leads a session that holds its DataLoader workers
        process.kill()
        return
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def unmarked_checkpoint(out: Path) -> Path | None:
    for path in out.glob("checkpoint-*"):
        if path.is_dir() and not (path / "checkpoint_complete").exists():
            return path
    return None


def run_with_kills(out: Path, torchrun: bool, argv: list, plan: list, site: Path, reference_seconds: float,
                   script: str = MEMES) -> list:
    """Runs the same command again and again, killing it as `plan` says, until one run ends by itself."""
    rng = random.Random(0)
    kills = []
    for moment in [*plan, None]:
        # Slow checkpoints where a kill is to come; the last run is left to end, so it saves at full speed.
        slow = {"SLOW_CHECKPOINT_SECONDS": "1.0"} if moment is not None else {}
        process = start(torchrun, *argv, "--output_dir", out, script=script, PYTHONPATH=f"{site}{os.pathsep}{ROOT}",
                        **slow)
        deadline = time.time() + 300
        if moment == "while writing a checkpoint":
            while process.poll() is None and time.time() < deadline and unmarked_checkpoint(out) is None:
                time.sleep(0.02)
        elif moment is not None:
            time.sleep(rng.uniform(0.2, 0.7) * reference_seconds)
        if moment is None or process.poll() is not None:  # the run got to its end first
            code, output = finish(process)
            assert code == 0, output[-4000:]
            return kills
        kills.append((moment, unmarked_checkpoint(out)))
        kill_all(process)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("mode, torchrun", [("full ZeRO-2", True), ("LoRA", False)])
def test_killed_at_any_moment_and_rerun_gives_the_uninterrupted_result(site, tmp_path, request, mode, torchrun):
    # The uninterrupted run is the one the resume tests (and for ZeRO-2, the preemption test) compare with too.
    argv, straight, seconds = request.getfixturevalue("zero2_reference" if torchrun else "lora_reference")

    out = tmp_path / "killed"
    plan = ["while writing a checkpoint", "at a random moment", "while writing a checkpoint", "at a random moment"]
    kills = run_with_kills(out, torchrun, argv, plan, site, seconds)
    assert [k for k in kills if k[0] == "while writing a checkpoint" and k[1] is not None], kills
    assert list(out.glob("incomplete-checkpoint-*")), "a checkpoint killed mid-write was set aside"
    assert not list(out.glob(".run.lock"))

    assert log_losses(out / "checkpoint-6") == pytest.approx(log_losses(straight / "checkpoint-6"), rel=1e-5)
    name = "model.safetensors" if torchrun else "adapter_model.safetensors"
    a, b = weights(straight / name), weights(out / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "eval_after.json").read_text())["num_examples"] == 2


def files_of(folder: Path) -> dict[str, tuple[float, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stopped_by_sigterm(process: subprocess.Popen) -> tuple[int, str, int]:
    """SIGTERM once training has begun: (exit status, output, the step the run says it stopped at, said once)."""
    deadline = time.time() + 300
    while "'loss'" not in output_of(process) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until training has begun
    process.send_signal(signal.SIGTERM)
    code, output = finish(process)
    stopped = [line for line in output.splitlines() if line.startswith("Stopped by SIGTERM at step")]
    assert len(stopped) == 1, output[-4000:]  # said once
    return code, output, int(stopped[0].split("at step ")[1].split(":")[0])


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_rerun_loses_no_step(zero2_reference, tmp_path):
    """Preemption under torchrun: the scheduler signals the launcher, which passes it on to the process group of
    every worker, DataLoader workers included (the default count of them: they must not die before the step)."""
    from phivision.training.arguments import RecipeTrainingArguments

    workers = RecipeTrainingArguments.dataloader_num_workers
    assert workers > 0
    # The reference run's training; checkpoints only where the signal stops it and at the end.
    argv = [*zero2_reference.flags, "--save_steps", 100, "--dataloader_num_workers", workers]
    straight = zero2_reference.out

    out = tmp_path / "preempted"
    code, output, step = stopped_by_sigterm(launch(True, *argv, "--output_dir", out))
    assert 1 <= step < 6 and (out / f"checkpoint-{step}" / "checkpoint_complete").is_file()
    assert [path.name for path in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]  # saved for the signal only
    assert "Traceback" not in output.split("Stopped by SIGTERM")[0] and "DataLoader worker" not in output
    # torchrun itself ends with its SignalException traceback and status 1 (what the README says).
    assert code == 1 and "SignalException" in output.split("Stopped by SIGTERM")[1], output[-3000:]

    code, output = finish(start(True, *argv, "--output_dir", out))  # the rerun, on forked ranks: resuming is ours
    assert code == 0 and f"Resuming from {out / f'checkpoint-{step}'}" in output, output[-4000:]
    assert log_losses(out / "checkpoint-6") == log_losses(straight / "checkpoint-6")
    resumed, uninterrupted = weights(out / "model.safetensors"), weights(straight / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # bit-identical

    # Re-running the finished command trains nothing and changes no file.
    before = files_of(out)
    code, output = finish(start(True, *argv, "--output_dir", out))
    assert code == 0 and output.count(f"The run in {out} is complete") == 1, output[-3000:]
    assert files_of(out) == before


def test_a_run_killed_after_its_last_step_finishes_without_training_past_max_steps(tiny, shapes, tmp_path):
    argv = ["--model_name_or_path", str(tiny), "--dataset_name_or_path", str(shapes), "--use_lora", "--lora_rank",
            "4", "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "3", "--save_steps", "1",
            "--max_eval_samples", "2", "--output_dir", str(tmp_path / "out")]
    run_recipe(MEMES, *argv)
    first = weights(tmp_path / "out" / "adapter_model.safetensors")
    (tmp_path / "out" / "eval_after.json").unlink()  # as if killed during the evaluation after training
    run_recipe(MEMES, *argv)
    assert not (tmp_path / "out" / "checkpoint-4").exists()
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    again = weights(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (tmp_path / "out" / "eval_after.json").is_file()


@pytest.mark.parametrize("mode", [[], ["--freeze_vision_model"], ["--use_lora", "--lora_rank", "4"],
                                  ["--use_qlora", "--bf16", "--lora_rank", "4"]],
                         ids=["full", "frozen vision", "LoRA", "QLoRA"])
def test_two_seeded_runs_are_bit_identical(tiny, shapes, tmp_path, mode):
    def trained(out: Path) -> dict[str, torch.Tensor]:
        run_recipe(MEMES, "--model_name_or_path", str(tiny), "--dataset_name_or_path", str(shapes),
                   "--output_dir", str(out), "--deepspeed", "none", "--batch_size", "4", "--batch_size_per_gpu", "2",
                   "--max_steps", "3", "--max_eval_samples", "2", "--skip_eval_before", "--seed", "3",
                   "--learning_rate", "1e-2", "--save_steps", "100", *mode)
        name = "adapter_model.safetensors" if "--lora_rank" in mode else "model.safetensors"
        return weights(out / name)

    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], trained_k) for k, trained_k in weights(
        tiny / "model.safetensors").items() if k in a) or "--lora_rank" in mode


def truncated_jpeg(path: Path, seed: int = 0) -> None:
    random_image(120, 90, seed).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header reads; the pixels do not


def test_unreadable_images_met_mid_run_are_named_skipped_and_listed_on_two_ranks(tiny, tmp_path):
    """A Hub row whose image is truncated: the header check at start passes, decoding fails in training."""
    import datasets

    from phivision.synthetic import shapes_rows

    rows = shapes_rows(520, seed=5)
    truncated_jpeg(tmp_path / "bad.jpg")
    bad = [{"bytes": (tmp_path / "bad.jpg").read_bytes(), "path": None}]
    images = [bad if i in (3, 507) else row["images"] for i, row in enumerate(rows)]  # an eval row, a training row
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                  "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                             "source": datasets.Value("string")}]})
    table = {"images": images, "texts": [row["texts"] for row in rows]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(tmp_path / "data"))
    out = tmp_path / "out"
    result = forked_recipe(MEMES, "--model_name_or_path", str(tiny), "--dataset_name_or_path", str(tmp_path / "data"),
                           "--output_dir", str(out), "--use_lora", "--lora_rank", "4", "--batch_size", "4",
                           "--batch_size_per_gpu", "2", "--num_train_epochs", "1", "--max_eval_samples", "8",
                           "--max_bad_samples", "1")
    output = result.stdout + result.stderr
    assert output.count("unreadable, skipped during training: ") == 1
    assert f"{tmp_path / 'data'} [train] row 507: OSError" in output.split(
        "unreadable, skipped during training: ")[1].splitlines()[0]
    assert output.count("unreadable, not evaluated: ") == 2  # before and after
    assert f"{tmp_path / 'data'} [train] row 3: OSError" in output
    assert "1 unreadable sample(s) were skipped" in output
    after = json.loads((out / "eval_after.json").read_text())
    assert after["num_examples"] == 7 and "row 3" in after["skipped"][0]["where"]


def test_unreadable_frames_in_converted_data_are_named_by_file_and_line(tiny, tmp_path, capsys):
    """A truncated frame (its header reads: met mid-run) and a frame with a broken header (met at load) are skipped
    within --max_bad_samples, named by their line and by the image file, as a Hub row with the same fault is."""
    sys.path[:0] = [str(ROOT)]
    data = tmp_path / "converted"
    (data / "images").mkdir(parents=True)
    for i in range(6):
        random_image(64, 48, seed=i).save(data / "images" / f"f{i}.jpg", quality=90)
    truncated_jpeg(data / "images" / "f4.jpg")
    (data / "images" / "f2.jpg").write_bytes(b"\xff\xd8 not a JPEG header")
    records = [{"id": f"r{i}", "conversations": [{"images": [f"f{i}.jpg"], "user": "Which action?",
                                                  "assistant": "Running" if i % 2 else "Jumping"}]} for i in range(6)]
    for split in ("train", "test"):
        (data / f"ucf101_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_recipe("finetune_hf_trainer_ucf101.py", "--model_name_or_path", str(tiny), "--data_dir", str(data),
               "--output_dir", str(tmp_path / "out"), "--use_lora", "--lora_rank", "4", "--batch_size", "2",
               "--batch_size_per_gpu", "2", "--num_train_epochs", "1", "--max_bad_samples", "2")
    out = capsys.readouterr().out
    truncated, broken = data / "images" / "f4.jpg", data / "images" / "f2.jpg"
    assert (f"unreadable, skipped during training: {data / 'ucf101_train.jsonl'}:5: OSError: {truncated}: image file "
            "is truncated") in out
    assert f"unreadable, not evaluated: {data / 'ucf101_test.jsonl'}:5: OSError: {truncated}: image file is" in out
    assert (f"unreadable, skipped: {data / 'ucf101_train.jsonl'}:3: UnidentifiedImageError: cannot identify image "
            f"file '{broken}'") in out
    assert f"unreadable, not evaluated: {data / 'ucf101_test.jsonl'}:3: UnidentifiedImageError" in out
    assert "2 unreadable sample(s) were skipped" in out


def test_too_many_unreadable_samples_stop_the_run_with_a_checkpoint_and_the_list(tiny, tmp_path, capsys):
    from phivision.errors import SetupError

    data = tmp_path / "converted"
    (data / "images").mkdir(parents=True)
    records = []
    for i in range(8):
        name = f"f{i}.jpg"
        if i in (2, 5):
            truncated_jpeg(data / "images" / name, seed=i)
        else:
            random_image(64, 48, seed=i).save(data / "images" / name, quality=90)
        records.append({"id": f"r{i}", "conversations": [{"images": [name], "user": "Which?", "assistant": "A"}]})
    (data / "ucf101_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "ucf101_test.jsonl").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(SetupError, match=r"2 samples could not be read .* more than --max_bad_samples 1: stopped at "
                                         r"step \d+ with .*checkpoint-\d+"):
        run_recipe("finetune_hf_trainer_ucf101.py", "--model_name_or_path", str(tiny), "--data_dir", str(data),
                   "--output_dir", str(tmp_path / "out"), "--use_lora", "--lora_rank", "4", "--batch_size", "2",
                   "--batch_size_per_gpu", "2", "--num_train_epochs", "1", "--max_bad_samples", "1",
                   "--train_sampling_strategy", "sequential", "--skip_eval_before")
    out = capsys.readouterr().out
    assert "ucf101_train.jsonl:3: OSError" in out and "ucf101_train.jsonl:6: OSError" in out
    assert list((tmp_path / "out").glob("checkpoint-*/checkpoint_complete"))


# (extra flags, what the one line says, exit status); each is checked before the model loads.
def setup_mistakes(tiny: Path, shapes: Path, tmp_path: Path) -> list:
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.json").write_text("{ not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_checkpoint").mkdir()
    small = make_shapes_dataset(tmp_path / "small", num_train=0, num_eval=300)
    return [
        (["--batch_size", "10", "--batch_size_per_gpu", "4"], "--batch_size 10 must be a multiple of processes x "
                                                              "--batch_size_per_gpu = 1 x 4 = 4", 2),
        (["--num_crops", "0"], "--num_crops must be at least 1, got 0", 2),
        (["--eval_batch_size", "0"], "--eval_batch_size must be at least 1, got 0", 2),
        (["--report_to", "bogus"], "--report_to bogus: not one of none, all, ", 2),
        (["--lr_scheduler_kwargs", "{bad"], "--lr_scheduler_kwargs {bad: not valid JSON (", 2),
        (["--batch_size_per_gpu", "0"], "--batch_size and --batch_size_per_gpu must be at least 1", 2),
        (["--lora_rank", "0", "--use_lora"], "--lora_rank must be at least 1, got 0", 2),
        (["--batchsize", "8"], "unrecognized arguments: --batchsize 8 (did you mean --batch_size?)", 2),
        (["--deepspeed", str(tmp_path / "missing.json")], f"--deepspeed {tmp_path / 'missing.json'}: no such file", 2),
        (["--deepspeed", str(tmp_path / "bad.json")], f"--deepspeed {tmp_path / 'bad.json'}: not valid JSON", 2),
        (["--output_dir", str(tmp_path / "a_file")], f"--output_dir {tmp_path / 'a_file'}: a file, not a folder", 2),
        (["--max_seq_length", "5"], "no training sample fits --max_seq_length 5", 1),
        (["--model_name_or_path", "./nowhere/phi"], "--model_name_or_path ./nowhere/phi: no such folder", 1),
        (["--dataset_name_or_path", str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such folder", 1),
        (["--dataset_name_or_path", str(tmp_path / "empty")], "no saved dataset (dataset_dict.json) and no parquet", 1),
        (["--dataset_name_or_path", str(small)], "the dataset has 300 rows, and its first 500 are held out", 1),
        (["--resume_from_checkpoint", str(tmp_path / "not_a_checkpoint")], "not a checkpoint folder", 1),
    ]


def test_setup_mistakes_are_one_line_naming_the_flag_before_the_model_loads(tiny, shapes, tmp_path, capsys,
                                                                          monkeypatch):
    from phivision.errors import SetupError
    from phivision.training import modes

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the mistake was found")

    monkeypatch.setattr(modes, "load_for_training", no_model)
    monkeypatch.setattr("phivision.training.recipe.load_for_training", no_model)
    for argv, message, status in setup_mistakes(tiny, shapes, tmp_path):
        base = ["--model_name_or_path", str(tiny), "--dataset_name_or_path", str(shapes), "--deepspeed", "none",
                "--output_dir", str(tmp_path / "out")]
        try:
            run_recipe(MEMES, *base, *argv)
        except SystemExit as e:
            assert e.code == status == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert message in err[-1], (argv, err)
        except SetupError as e:
            assert status == 1 and message in str(e), (argv, str(e))
            assert "\n" not in str(e)
        else:
            pytest.fail(f"{argv} was accepted")


def test_a_setup_mistake_under_torchrun_is_one_line_printed_once(tiny, shapes, tmp_path):
    code, output = finish(launch(True, "--model_name_or_path", tiny, "--dataset_name_or_path", tmp_path / "nowhere",
                                 "--output_dir", tmp_path / "out", "--use_lora"))
    worker_output = output.split("ChildFailedError")[0]  # what torchrun itself adds after a failed worker is its own
    assert code != 0 and worker_output.count(f"error: {tmp_path / 'nowhere'}: no such folder") == 1, output[-3000:]
    assert "Traceback" not in worker_output.split("error: ")[0]


def test_a_second_run_into_the_same_output_dir_is_refused(tiny, shapes, tmp_path):
    argv = ["--model_name_or_path", tiny, "--dataset_name_or_path", shapes, "--output_dir", tmp_path / "out",
            "--use_lora", "--lora_rank", 4, "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_steps", 200,
            "--max_eval_samples", 2, "--skip_eval_before"]
    first = launch(False, *argv)
    deadline = time.time() + 120
    while not (tmp_path / "out" / ".run.lock").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = forked_run(ROOT / MEMES, [*COMMON, *argv], nproc=None)  # one process, as `launch(False)` starts
    kill_all(first)
    output = second.stdout + second.stderr
    assert second.returncode == 1 and f"is in use by another run (host {os.uname().nodename}, pid {first.pid}" in output, output
