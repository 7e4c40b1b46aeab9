"""phivision.training.trainer: the length filter, the rows the Trainer sees, length-grouped and LongRoPE-sided order."""

import pytest
import torch
from helpers import identity, random_image, sample
from PIL import Image

from phivision.collator import DataCollator
from phivision.data import load_hf_dataset
from phivision.errors import SetupError
from phivision.training import parse_args
from phivision.training.trainer import RecipeTrainer, TrainingSamples, filter_by_length

LARGE = random_image(400, 300, seed=2)


def kept_rows(*args, **kwargs) -> tuple[list[int], list[int]]:
    """(indices, token counts) of the rows filter_by_length keeps."""
    rows = filter_by_length(*args, **kwargs)
    return rows.indices, rows.lengths
TALL = random_image(300, 400, seed=3)


def _rows():
    return [
        sample("What is shown in this image?", "A dog.", LARGE),  # long
        sample("Hello world!", "Hi."),  # short
        sample("What is shown in this image?", "A dog.", random_image(80, 20)),  # medium: 4x1 crops, not 2x2
        sample("Compare the two images.", "The left one.", LARGE, TALL),  # longest
    ]


def test_filter_by_length_skips_rows_over_the_budget(tiny_processor, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rows = _rows()
    collator = DataCollator(tiny_processor, identity, num_crops=4)
    lengths = [collator([row])["input_ids"].shape[1] for row in rows]
    assert lengths[1] < lengths[2] < lengths[0] < lengths[3]

    kept, kept_lengths = kept_rows(rows, identity, tiny_processor, 4, lengths[0], disable_tqdm=True)
    assert kept == [0, 1, 2]  # a row exactly at the budget is kept
    assert kept_lengths == lengths[:3]  # whole rows: nothing truncated
    out = capsys.readouterr().out
    assert f"3 kept, 1 skipped as longer than --max_seq_length {lengths[0]}" in out
    assert f"longest kept {lengths[0]} tokens" in out
    assert out.count("\n") == 1

    kept, kept_lengths = kept_rows(rows, identity, tiny_processor, 4, lengths[0] - 1,
                                                   disable_tqdm=True)
    assert (kept, kept_lengths) == ([1, 2], [lengths[1], lengths[2]])
    assert "2 kept, 2 skipped" in capsys.readouterr().out

    kept, kept_lengths = kept_rows(rows, identity, tiny_processor, 4, None, disable_tqdm=True)
    assert (kept, kept_lengths) == ([0, 1, 2, 3], lengths)
    assert "4 kept, 0 skipped" in capsys.readouterr().out

    # num_crops 1 makes the image rows shorter, so more fit.
    short = [DataCollator(tiny_processor, identity, num_crops=1)([row])["input_ids"].shape[1] for row in rows]
    kept, kept_lengths = kept_rows(rows, identity, tiny_processor, 1, lengths[2], disable_tqdm=True)
    assert kept_lengths == [short[i] for i in kept]
    assert kept == [i for i in range(4) if short[i] <= lengths[2]] and len(kept) > 2

    with pytest.raises(SetupError, match="no training sample fits --max_seq_length"):
        filter_by_length(rows, identity, tiny_processor, 4, lengths[1] - 1, disable_tqdm=True)
    assert "0 kept, 4 skipped" in capsys.readouterr().out


def test_filter_by_length_prints_only_on_the_main_process(tiny_processor, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    kept, _ = kept_rows(_rows(), identity, tiny_processor, 4, None, disable_tqdm=True)
    assert kept == [0, 1, 2, 3]
    assert capsys.readouterr().out == ""


def test_rows_dataset_maps_indices():
    rows = ["a", "b", "c", "d", "e"]
    dataset = TrainingSamples(rows, [4, 0, 2])
    assert len(dataset) == 3
    assert [dataset[i] for i in range(len(dataset))] == ["e", "a", "c"]
    assert len(TrainingSamples(rows, [])) == 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=list)
    assert list(loader) == [["e", "a"], ["c"]]


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)


def test_length_grouped_batches_have_little_padding(tiny_processor, tmp_path, single_process):
    """The default sampler batches samples of similar token counts (measured at start)."""
    import random

    from phivision import Phi3VForCausalLM
    from phivision.tiny import tiny_config

    rng = random.Random(0)
    # 400 rows: two of the sampler's megabatches (50 batches each), sorted apart; the tokenizer's work is the cost.
    rows = [sample(" ".join(["word"] * rng.randint(300, 2400)), "yes" if i % 2 else "no") for i in range(400)]
    kept, lengths = kept_rows(rows, identity, tiny_processor, 1, None, disable_tqdm=True)

    def padding_fraction(group_by_length: bool) -> float:
        argv = ["--output_dir", str(tmp_path), "--batch_size", "4", "--batch_size_per_gpu", "4", "--deepspeed", "none",
                "--dataloader_num_workers", "0", f"--group_by_length={group_by_length}"]
        args = parse_args(argv=argv)
        collator = DataCollator(tiny_processor, identity, num_crops=1)
        trainer = RecipeTrainer(
            model=Phi3VForCausalLM(tiny_config()), args=args.training,
            train_dataset=TrainingSamples(rows, kept, lengths, encode=collator.encode), data_collator=collator.collate,
        )
        masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]
        return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)

    grouped, random_order = padding_fraction(True), padding_fraction(False)
    assert grouped < 0.05 < random_order


def test_filter_by_length_reads_image_sizes_without_decoding_pixels(tiny_processor, tmp_path, monkeypatch):
    """Counting tokens over a datasets.Dataset opens image headers only (documents are big PNGs)."""
    import datasets

    from phivision.synthetic import make_shapes_dataset

    rows = load_hf_dataset(str(make_shapes_dataset(tmp_path / "shapes", num_train=6, num_eval=0)))

    def cauldron(row):
        turns = [{"user": t["user"], "assistant": t["assistant"], "images": row["images"]} for t in row["texts"]]
        return turns, row["images"]

    expected = [tiny_processor.num_conversation_tokens(cauldron(rows[i])[0], [im.size for im in rows[i]["images"]], 4)
                for i in range(len(rows))]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(datasets.features.Image, "decode_example", no_decoding)
    kept, lengths = kept_rows(rows, cauldron, tiny_processor, 4, None, disable_tqdm=True)
    assert kept == list(range(len(rows))) and lengths == expected


def test_filter_by_length_on_converted_data_reads_frame_headers_only(tiny_processor, tmp_path, monkeypatch):
    """The ucf101 recipe opens frames lazily: counting tokens over thousands of 8-frame clips decodes nothing."""
    import importlib.util
    import json
    from pathlib import Path

    from PIL import ImageFile

    from phivision.data import load_jsonl_dataset

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (320, 240), (80 * i, 0, 0)).save(tmp_path / "images" / f"f{i}.jpg")
    records = [{"id": f"train-{i}", "conversations": [
        {"images": [f"f{j}.jpg" for j in range(i + 1)], "user": "Which action?", "assistant": "Running."}]}
        for i in range(3)]
    (tmp_path / "ucf101_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    script = Path(__file__).resolve().parents[1] / "finetune_hf_trainer_ucf101.py"
    spec = importlib.util.spec_from_file_location("finetune_hf_trainer_ucf101", script)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    rows = load_jsonl_dataset(tmp_path, "train")

    def format_row(row):
        return recipe.format_example(row, tmp_path / "images")

    expected = [tiny_processor.num_conversation_tokens(r["conversations"], [(320, 240)] * (i + 1), 4) for i, r in enumerate(rows)]
    batch = DataCollator(tiny_processor, format_row, num_crops=4)(rows)  # the frames decode for training
    assert batch["pixel_values"].shape[0] == 6 and batch["attention_mask"].sum(1).tolist() == expected

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    kept, lengths = kept_rows(rows, format_row, tiny_processor, 4, None, disable_tqdm=True)
    assert kept == [0, 1, 2] and lengths == expected


@pytest.mark.parametrize("group_by_length, packing", [(True, False), (False, False), (False, True)])
def test_training_batches_stay_on_one_side_of_the_longrope_switch(tiny_processor, tmp_path, single_process,
                                                                   group_by_length, packing):
    """A batch whose longest sample passes LongRoPE's switch gives all its samples the long factors."""
    import random

    from phivision import Phi3VForCausalLM
    from phivision.tiny import tiny_config

    rng = random.Random(0)
    rows = [sample(" ".join(["word"] * rng.randint(300, 1700)), "yes") for _ in range(103)]
    kept, lengths = kept_rows(rows, identity, tiny_processor, 1, None, disable_tqdm=True)
    limit = sorted(lengths)[40]  # 62 samples past the switch
    argv = ["--output_dir", str(tmp_path), "--batch_size", "4", "--batch_size_per_gpu", "4", "--deepspeed", "none",
            "--dataloader_num_workers", "0", f"--group_by_length={group_by_length}", f"--packing={packing}"]
    collator = DataCollator(tiny_processor, identity, num_crops=1, packing=packing)
    trainer = RecipeTrainer(
        model=Phi3VForCausalLM(tiny_config(original_max_position_embeddings=limit)),
        args=parse_args(argv=argv).training,
        train_dataset=TrainingSamples(rows, kept, lengths, encode=collator.encode), data_collator=collator.collate,
    )
    batches = []
    for batch in trainer.get_train_dataloader():
        sizes = batch["cu_seq_lens_q"].diff() if packing else batch["attention_mask"].sum(1)
        batches.append(sizes.tolist())
    assert sorted(n for sizes in batches for n in sizes) == sorted(lengths)  # every sample once
    assert max(batches[0]) == max(lengths)  # the longest batch first
    mixed = [sizes for sizes in batches if min(sizes) <= limit < max(sizes)]
    assert mixed in ([], [batches[-1]])  # only the epoch's last batch may hold leftovers of both sides


def test_an_unreadable_sample_is_named_and_replaced_by_the_next(tiny_processor, tmp_path):
    """A truncated JPEG passes the header check at start; decoding it for training must not end the run."""
    good = tmp_path / "good.jpg"
    random_image(120, 90).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    rows = [(tmp_path / name) for name in ("good.jpg", "cut.jpg", "good.jpg")]
    locations = ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]

    def open_frame(path):
        return [{"user": "Colour?", "assistant": "red", "images": [path.name]}], [Image.open(path)]

    from phivision.data.rows import Records

    records = Records(rows, locations)
    kept = kept_rows(records, open_frame, tiny_processor, 1, None, disable_tqdm=True)
    assert kept[0] == [0, 1, 2]  # the header reads fine
    collator = DataCollator(tiny_processor, open_frame, num_crops=1)
    samples = TrainingSamples(records, *kept, encode=collator.encode)
    first, second = samples[0], samples[1]
    assert first["bad_samples"] == []
    assert len(second["bad_samples"]) == 1 and second["bad_samples"][0].startswith("data.jsonl:2: OSError")
    assert second["input_ids"] == first["input_ids"]  # row 3 (the same good image) took its place
    batch = collator.collate([first, second])
    assert batch["input_ids"].shape[0] == 2 and batch["bad_samples"] == second["bad_samples"]


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_trainer_bar_shows_the_loss_unless_bars_are_off(tiny_processor, tmp_path, single_process, disable_tqdm):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from phivision import Phi3VForCausalLM
    from phivision.tiny import tiny_config
    from phivision.training.progress import LossProgressCallback

    args = parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none", f"--disable_tqdm={disable_tqdm}"])
    trainer = RecipeTrainer(model=Phi3VForCausalLM(tiny_config()), args=args.training, train_dataset=TrainingSamples([], []),
                           data_collator=DataCollator(tiny_processor, identity, num_crops=1))
    bars = [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, (ProgressCallback, PrinterCallback))]
    assert bars == ([PrinterCallback] if disable_tqdm else [LossProgressCallback])


@pytest.mark.parametrize("stage, should_save, builds_state_dict", [(2, False, False), (2, True, True), (3, False, True)])
def test_only_the_saving_process_builds_the_state_dict_under_zero2(tiny_processor, tmp_path, single_process, monkeypatch,
                                                                   stage, should_save, builds_state_dict):
    """ZeRO-2 keeps the whole model on every rank: the others need no 8 GB host copy of it. ZeRO-3 gathers it
    with every rank taking part, so none may skip."""
    import types

    from phivision import Phi3VForCausalLM
    from phivision.tiny import tiny_config

    args = parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none"])
    trainer = RecipeTrainer(model=Phi3VForCausalLM(tiny_config()), args=args.training, train_dataset=TrainingSamples([], []),
                           data_collator=DataCollator(tiny_processor, identity, num_crops=1))
    built = []
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    monkeypatch.setattr(trainer, "deepspeed", types.SimpleNamespace(config={"zero_optimization": {"stage": stage}}),
                        raising=False)
    monkeypatch.setattr(trainer, "model_wrapped", types.SimpleNamespace(save_checkpoint=lambda *a: None))
    monkeypatch.setattr(trainer.accelerator, "get_state_dict", lambda model: built.append(model) or {})
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: should_save))
    monkeypatch.setattr(trainer, "_save", lambda *a, **k: None)
    trainer.save_model(str(tmp_path / "final"))
    assert bool(built) == builds_state_dict


def test_data_workers_leave_sigterm_to_the_main_process(tiny_processor, tmp_path, single_process):
    """torchrun's SIGTERM reaches the whole process group: data workers that died of it ended the run with
    "DataLoader worker ... killed by signal" before the step could finish and checkpoint."""
    import multiprocessing
    import os
    import signal

    from phivision import Phi3VForCausalLM
    from phivision.tiny import tiny_config

    args = parse_args(argv=["--output_dir", str(tmp_path), "--deepspeed", "none", "--dataloader_num_workers", "2",
                            "--batch_size", "2", "--batch_size_per_gpu", "2",
                            "--train_sampling_strategy", "sequential"])
    trainer = RecipeTrainer(model=Phi3VForCausalLM(tiny_config()), args=args.training,
                           train_dataset=TrainingSamples(list(range(16)), list(range(16))),
                           data_collator=lambda rows: {"rows": torch.tensor(rows)})
    loader = iter(trainer.get_train_dataloader())
    rows = next(loader)["rows"].tolist()
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    rows += [n for batch in loader for n in batch["rows"].tolist()]
    assert sorted(rows) == list(range(16)) and all(worker.exitcode in (None, 0) for worker in workers)
