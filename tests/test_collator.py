"""Training batches (collator, token counting, length filter) and the shared recipe helpers of phi3v.training."""

import itertools

import numpy as np
import pytest
import torch
from helpers import image_runs
from PIL import Image

from phi3v import training
from phi3v.collator import Phi3VDataCollator, count_tokens, pack_batch
from phi3v.data import load_hf_dataset
from phi3v.processing import IGNORE_INDEX

PROMPT = "<|user|>\n{}<|end|>\n<|assistant|>\n"
END = "<|end|>\n"
FINAL = "<|end|>\n<|endoftext|>"


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SMALL = _image(40, 30, seed=1)
LARGE = _image(400, 300, seed=2)
TALL = _image(300, 400, seed=3)


def _identity(row):
    """Rows are already (turns, images)."""
    return row


def _sample(question: str, answer: str, *images: Image.Image):
    """A single-turn sample whose images all belong to the one turn."""
    turn = {"user": question, "assistant": answer}
    if images:
        turn["images"] = list(images)
    return [turn], list(images)


def _tokens(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _num_tokens(processor, image: Image.Image, num_crops: int) -> int:
    return processor.image_processor.num_image_tokens(*image.size, num_crops)


def _unpadded(batch, i: int, key: str) -> list[int]:
    n = int(batch["attention_mask"][i].sum())
    return batch[key][i, :n].tolist()


# ----------------------------------------------------------------------------- the collator


def test_single_turn_labels_only_the_answer(tiny_processor):
    question, answer = "What is shown in this image?", "A red square."
    batch = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)([_sample(question, answer, LARGE)])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    n_img = _num_tokens(tiny_processor, LARGE, 4)
    prompt = tiny_processor.encode_prompt(PROMPT.format("<|image_1|>\n" + question), [n_img])
    answer_ids = _tokens(tiny_processor, answer + FINAL)
    assert ids == prompt + answer_ids
    assert ids[0] == tiny_processor.tokenizer.bos_token_id
    assert ids[-1] == tiny_processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert image_runs(ids) == [(-1, n_img)]
    # Prompt and image positions masked, the answer (with <|end|>\n<|endoftext|>) learned as is.
    assert labels == [IGNORE_INDEX] * len(prompt) + answer_ids
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i < 0)
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert learned == answer_ids
    # (the tokenizer, like the real one, puts "▁" before the "\n" after <|end|>: decoding shows it as a space)
    assert tiny_processor.tokenizer.decode(learned).startswith(answer + "<|end|>")
    assert tiny_processor.tokenizer.decode(learned).endswith("\n<|endoftext|>")
    assert batch["attention_mask"].tolist() == [[1] * len(ids)]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long


def test_right_padding_and_rows_equal_encode_conversation(tiny_processor):
    samples = [
        _sample("Is this meme hateful?", "No, it is not.", SMALL),
        _sample("Describe the picture in one sentence.", "A small dog is sitting on the grass next to a blue ball.",
                LARGE),
        _sample("Answer briefly.", "yes"),
    ]
    batch = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)(samples)
    pad = tiny_processor.tokenizer.pad_token_id
    expected = [
        tiny_processor.encode_conversation(turns, [_num_tokens(tiny_processor, im, 4) for im in images])
        for turns, images in samples
    ]
    lengths = [len(ids) for ids, _ in expected]
    assert len(set(lengths)) == 3  # all different, so two rows are padded
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for i, ((ids, labels), n) in enumerate(zip(expected, lengths)):
        padding = max(lengths) - n
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * padding
        assert batch["input_ids"][i].tolist() == ids + [pad] * padding
        assert batch["labels"][i].tolist() == labels + [IGNORE_INDEX] * padding
    # Every masked kind of position: padding, images, prompts.
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["input_ids"] < 0] == IGNORE_INDEX).all()
    # Both images are upscaled to 2x2 crops at num_crops 4 (the HD transform fills the crop budget).
    assert batch["image_sizes"].tolist() == [[672, 672], [672, 672]]


def test_multi_image_turn(tiny_processor):
    question, answer = "Compare the two images.", "The first one is brighter."
    images = [SMALL, TALL]
    batch = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)([_sample(question, answer, *images)])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    counts = [_num_tokens(tiny_processor, im, 4) for im in images]
    prompt = tiny_processor.encode_prompt(PROMPT.format("<|image_1|>\n<|image_2|>\n" + question), counts)
    assert ids == prompt + _tokens(tiny_processor, answer + FINAL)
    assert image_runs(ids) == [(-1, counts[0]), (-2, counts[1])]
    assert labels == [IGNORE_INDEX] * len(prompt) + _tokens(tiny_processor, answer + FINAL)

    expected = tiny_processor.image_processor.preprocess(images, num_crops=4)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])
    assert batch["pixel_values"].shape == (2, 5, 3, 336, 336)


def test_multi_turn_labels_both_answers_and_numbers_images_across_turns(tiny_processor):
    q1, a1, q2, a2 = "What is shown in this image?", "A dog.", "And in this one?", "Two cats."
    turns = [
        {"user": q1, "assistant": a1, "images": [LARGE]},
        {"user": q2, "assistant": a2, "images": [SMALL, TALL]},
    ]
    batch = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)([(turns, [LARGE, SMALL, TALL])])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n1, n2, n3 = (_num_tokens(tiny_processor, im, 4) for im in (LARGE, SMALL, TALL))
    bos = tiny_processor.tokenizer.bos_token_id

    prompt1 = tiny_processor.encode_prompt(PROMPT.format("<|image_1|>\n" + q1), [n1])
    prompt2 = tiny_processor.encode_prompt(PROMPT.format("<|image_1|>\n<|image_2|>\n" + q2), [n2, n3])
    assert prompt2[0] == bos
    prompt2 = [i - 1 if i < 0 else i for i in prompt2[1:]]  # turn 2 continues the text: no BOS, images 2 and 3
    answer1, answer2 = _tokens(tiny_processor, a1 + END), _tokens(tiny_processor, a2 + FINAL)

    assert ids == prompt1 + answer1 + prompt2 + answer2
    assert ids[0] == bos and ids[len(prompt1) + len(answer1)] != bos
    assert image_runs(ids) == [(-1, n1), (-2, n2), (-3, n3)]
    assert labels == (
        [IGNORE_INDEX] * len(prompt1) + answer1 + [IGNORE_INDEX] * len(prompt2) + answer2
    )
    expected = tiny_processor.image_processor.preprocess([LARGE, SMALL, TALL], num_crops=4)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])


def test_turn_tags_place_images_and_a_wrong_image_split_is_rejected(tiny_processor):
    collator = Phi3VDataCollator(tiny_processor, _identity, num_crops=1)
    turns = [{"user": "Look: <|image_1|> and <|image_2|>.", "assistant": "ok", "images": [SMALL, LARGE]}]
    ids = collator([(turns, [SMALL, LARGE])])["input_ids"][0].tolist()
    counts = [_num_tokens(tiny_processor, im, 1) for im in (SMALL, LARGE)]
    prompt = tiny_processor.encode_prompt(PROMPT.format("Look: <|image_1|> and <|image_2|>."), counts)
    assert ids == prompt + _tokens(tiny_processor, "ok" + FINAL)
    # The images given to the collator must be the turns' images: an image no turn holds is an error.
    with pytest.raises(ValueError, match="num_image_tokens"):
        collator([([{"user": "hi", "assistant": "ok"}], [SMALL])])


def test_mixed_batch_of_text_only_and_image_samples(tiny_processor):
    collator = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)
    samples = [
        _sample("What is shown in this image?", "A square.", LARGE),
        _sample("Hello world!", "How are you today?"),
        _sample("Compare the two images.", "Both have a tree.", TALL, SMALL),
    ]
    batch = collator(samples)
    images = [LARGE, TALL, SMALL]
    expected = tiny_processor.image_processor.preprocess(images, num_crops=4)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])
    assert batch["image_sizes"].tolist() == [[672, 672], [672, 672], [672, 672]]
    assert int((batch["input_ids"] < 0).sum()) == sum(expected["num_img_tokens"])
    # Image ids are numbered within each row; the text-only row has none.
    assert image_runs(batch["input_ids"][0].tolist()) == [(-1, expected["num_img_tokens"][0])]
    assert image_runs(_unpadded(batch, 1, "input_ids")) == []
    assert image_runs(batch["input_ids"][2].tolist()) == [(-1, expected["num_img_tokens"][1]),
                                                       (-2, expected["num_img_tokens"][2])]
    assert _unpadded(batch, 1, "input_ids") == tiny_processor.encode_conversation(samples[1][0], [])[0]

    text_only = collator([_sample("Hello world!", "Hi."), _sample("Answer briefly.", "yes")])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}
    assert (text_only["input_ids"] >= 0).all()


def test_num_crops_changes_only_the_image_runs(tiny_processor):
    samples = [
        _sample("Compare the two images.", "The first one is brighter.", LARGE, TALL),
        _sample("What is shown in this image?", "A small dog.", SMALL),
    ]
    four = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)(samples)
    one = Phi3VDataCollator(tiny_processor, _identity, num_crops=1)(samples)
    assert four["pixel_values"].shape == (3, 5, 3, 336, 336)
    assert one["pixel_values"].shape == (3, 2, 3, 336, 336)
    assert four["image_sizes"].tolist() == [[672, 672]] * 3
    assert one["image_sizes"].tolist() == [[336, 336]] * 3
    for i in range(len(samples)):
        ids4, ids1 = _unpadded(four, i, "input_ids"), _unpadded(one, i, "input_ids")
        labels4, labels1 = _unpadded(four, i, "labels"), _unpadded(one, i, "labels")
        assert [t for t in ids4 if t >= 0] == [t for t in ids1 if t >= 0]
        assert [lab for t, lab in zip(ids4, labels4) if t >= 0] == [lab for t, lab in zip(ids1, labels1) if t >= 0]
        assert [v for v, _ in image_runs(ids4)] == [v for v, _ in image_runs(ids1)]
    runs4, runs1 = image_runs(_unpadded(four, 0, "input_ids")), image_runs(_unpadded(one, 0, "input_ids"))
    # 400x300 / 300x400: 2x2 crops at num_crops 4, 1x1 at num_crops 1.
    assert [n for _, n in runs4] == [5 * 144 + 1 + 3 * 12] * 2
    assert [n for _, n in runs1] == [2 * 144 + 1 + 2 * 12] * 2
    # Even the 40x30 image is upscaled to 2x2 crops at num_crops 4.
    assert image_runs(_unpadded(four, 1, "input_ids")) == [(-1, 757)]
    assert image_runs(_unpadded(one, 1, "input_ids")) == [(-1, 313)]


# ----------------------------------------------------------------------------- count_tokens


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_count_tokens_equals_collated_length(tiny_processor, num_crops):
    sizes = [(40, 30), (30, 40), (400, 300), (336, 336), (1000, 120), (120, 1000), (2000, 10), (700, 500)]
    samples = [_sample("What is shown in this image?", "A dog.", _image(w, h)) for w, h in sizes]
    samples.append(_sample("Compare the two images.", "The left one.", _image(700, 500), _image(40, 30)))
    samples.append(([{"user": "What is it?", "assistant": "A cat.", "images": [_image(500, 700)]},
                     {"user": "And this?", "assistant": "A dog.", "images": [_image(90, 60)]}],
                    [_image(500, 700), _image(90, 60)]))
    samples.append(_sample("Hello world!", "Hi."))
    collator = Phi3VDataCollator(tiny_processor, _identity, num_crops=num_crops)
    for turns, images in samples:
        n = count_tokens(tiny_processor, turns, [im.size for im in images], num_crops)
        batch = collator([(turns, images)])
        assert n == batch["input_ids"].shape[1], ([im.size for im in images], num_crops)


# ----------------------------------------------------------------------------- filter_by_length and RowsDataset


def _rows():
    return [
        _sample("What is shown in this image?", "A dog.", LARGE),  # long
        _sample("Hello world!", "Hi."),  # short
        _sample("What is shown in this image?", "A dog.", _image(80, 20)),  # medium: 4x1 crops, not 2x2
        _sample("Compare the two images.", "The left one.", LARGE, TALL),  # longest
    ]


def test_filter_by_length_skips_rows_over_the_budget(tiny_processor, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rows = _rows()
    collator = Phi3VDataCollator(tiny_processor, _identity, num_crops=4)
    lengths = [collator([row])["input_ids"].shape[1] for row in rows]
    assert lengths[1] < lengths[2] < lengths[0] < lengths[3]

    kept, kept_lengths = training.filter_by_length(rows, _identity, tiny_processor, 4, lengths[0], disable_tqdm=True)
    assert kept == [0, 1, 2]  # a row exactly at the budget is kept
    assert kept_lengths == lengths[:3]  # whole rows: nothing truncated
    out = capsys.readouterr().out
    assert f"3 kept, 1 skipped as longer than --max_seq_length {lengths[0]}" in out
    assert f"longest kept {lengths[0]} tokens" in out
    assert out.count("\n") == 1

    kept, kept_lengths = training.filter_by_length(rows, _identity, tiny_processor, 4, lengths[0] - 1,
                                                   disable_tqdm=True)
    assert (kept, kept_lengths) == ([1, 2], [lengths[1], lengths[2]])
    assert "2 kept, 2 skipped" in capsys.readouterr().out

    kept, kept_lengths = training.filter_by_length(rows, _identity, tiny_processor, 4, None, disable_tqdm=True)
    assert (kept, kept_lengths) == ([0, 1, 2, 3], lengths)
    assert "4 kept, 0 skipped" in capsys.readouterr().out

    # num_crops 1 makes the image rows shorter, so more fit.
    short = [Phi3VDataCollator(tiny_processor, _identity, num_crops=1)([row])["input_ids"].shape[1] for row in rows]
    kept, kept_lengths = training.filter_by_length(rows, _identity, tiny_processor, 1, lengths[2], disable_tqdm=True)
    assert kept_lengths == [short[i] for i in kept]
    assert kept == [i for i in range(4) if short[i] <= lengths[2]] and len(kept) > 2

    with pytest.raises(ValueError, match="--max_seq_length"):
        training.filter_by_length(rows, _identity, tiny_processor, 4, lengths[1] - 1, disable_tqdm=True)
    assert "0 kept, 4 skipped" in capsys.readouterr().out


def test_filter_by_length_prints_only_on_the_main_process(tiny_processor, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    kept, _ = training.filter_by_length(_rows(), _identity, tiny_processor, 4, None, disable_tqdm=True)
    assert kept == [0, 1, 2, 3]
    assert capsys.readouterr().out == ""


def test_rows_dataset_maps_indices():
    rows = ["a", "b", "c", "d", "e"]
    dataset = training.RowsDataset(rows, [4, 0, 2])
    assert len(dataset) == 3
    assert [dataset[i] for i in range(len(dataset))] == ["e", "a", "c"]
    assert len(training.RowsDataset(rows, [])) == 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=list)
    assert list(loader) == [["e", "a"], ["c"]]


# ----------------------------------------------------------------------------- load_hf_dataset


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the parquet builder's cache inside tmp_path."""
    import datasets

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_load_hf_dataset_from_save_to_disk(tmp_path):
    from phi3v.synthetic import make_shapes_dataset

    path = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_eval=1)
    rows = load_hf_dataset(str(path))
    assert len(rows) == 3
    row = rows[0]
    assert isinstance(row["images"][0], Image.Image)
    assert row["texts"][0]["assistant"] in {"red", "green", "blue"}
    assert load_hf_dataset(str(path), split="train")[2]["texts"] == rows[2]["texts"]
    with pytest.raises(ValueError, match=r"\['train'\]") as error:
        load_hf_dataset(str(path), split="test")
    assert "'test'" in str(error.value)


def test_load_hf_dataset_from_parquet_files(tmp_path, datasets_cache):
    import datasets

    folder = tmp_path / "parquet"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"query": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]}).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"query": ["t1", "t2"], "answer": ["b1", "b2"]}).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet"))

    train = load_hf_dataset(str(folder), split="train")
    test = load_hf_dataset(str(folder), split="test")
    assert list(train["query"]) == ["q1", "q2", "q3"]
    assert list(test["query"]) == ["t1", "t2"] and list(test["answer"]) == ["b1", "b2"]
    with pytest.raises(FileNotFoundError, match="'validation'"):
        load_hf_dataset(str(folder), split="validation")


def test_load_hf_dataset_single_parquet_split_and_empty_folder(tmp_path, datasets_cache):
    import datasets

    single = tmp_path / "single"
    single.mkdir()
    datasets.Dataset.from_dict({"x": [1, 2]}).to_parquet(str(single / "part.parquet"))
    assert list(load_hf_dataset(str(single))["x"]) == [1, 2]  # any *.parquet is the train split

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        load_hf_dataset(str(empty))
    with pytest.raises(FileNotFoundError):
        load_hf_dataset(str(empty), split="test")


# ----------------------------------------------------------------------------- lora_target_modules


@pytest.fixture(scope="module")
def tiny_model():
    from phi3v.modeling import Phi3VForCausalLM
    from phi3v.tiny import tiny_config

    torch.manual_seed(0)
    return Phi3VForCausalLM(tiny_config()).eval()


def test_lora_target_modules(tiny_model):
    with_vision = training.lora_target_modules(tiny_model, include_vision=True)
    without = training.lora_target_modules(tiny_model, include_vision=False)
    assert len(set(with_vision)) == len(with_vision)
    modules = dict(tiny_model.named_modules())
    assert all(isinstance(modules[name], torch.nn.Linear) for name in with_vision)

    language = ["lm_head"] + [
        f"model.layers.{i}.{leaf}"
        for i in range(tiny_model.config.num_hidden_layers)
        for leaf in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    assert sorted(without) == sorted(language)
    assert not any("vision_embed_tokens" in name for name in without)

    vision = [name for name in with_vision if "vision_embed_tokens" in name]
    assert sorted(with_vision) == sorted(language + vision)
    embed = "model.vision_embed_tokens"
    assert f"{embed}.img_projection.0" in vision and f"{embed}.img_projection.2" in vision
    clip = [name for name in vision if ".encoder.layers." in name]
    assert len(vision) == 2 + len(clip)
    tower = tiny_model.model.vision_embed_tokens.img_processor
    assert len(tower.vision_model.encoder.layers) == 3 and tower.num_layers_used == 2
    expected_clip = {
        f"encoder.layers.{i}.{leaf}"
        for i in (0, 1)
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2")
    }
    assert {name.split(".vision_model.", 1)[1] for name in clip} == expected_clip
    assert len(clip) == 12
    assert not any(".encoder.layers.2." in name for name in with_vision)
    assert not any("post_layernorm" in name or "patch_embedding" in name for name in with_vision)


# ----------------------------------------------------------------------------- FinetuneArguments and TrainingArguments


def test_finetune_arguments_validation():
    with pytest.raises(ValueError, match="--num_crops"):
        training.FinetuneArguments(num_crops=0)
    with pytest.raises(ValueError, match="--num_crops"):
        training.parse_args(argv=["--num_crops", "0"])
    with pytest.raises(ValueError, match="--batch_size"):
        training.FinetuneArguments(batch_size_per_gpu=0)
    args = training.FinetuneArguments(use_qlora=True)
    assert args.use_lora and args.use_qlora
    assert not training.FinetuneArguments().use_lora


def test_parse_args_flags():
    assert training.parse_args(argv=[]).no_tqdm is False
    assert training.parse_args(argv=["--no-tqdm"]).no_tqdm is True
    assert training.parse_args(argv=["--no_tqdm"]).no_tqdm is True
    args = training.parse_args(argv=["--use_qlora", "--num_crops", "4", "--max_seq_length", "2048"])
    assert (args.use_lora, args.use_qlora, args.num_crops, args.max_seq_length) == (True, True, 4, 2048)
    assert training.parse_args(argv=[], num_crops=4).num_crops == 4  # per-task defaults
    assert training.parse_args(argv=["--no_gradient_checkpointing"]).gradient_checkpointing is False


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)


def test_training_arguments_gradient_accumulation(tmp_path, single_process):
    args = training.parse_args(argv=["--output_dir", str(tmp_path / "out"), "--batch_size", "12",
                                     "--batch_size_per_gpu", "3", "--deepspeed", "none", "--no-tqdm"])
    targs = training.training_arguments(args)
    assert targs.gradient_accumulation_steps == 4
    assert targs.per_device_train_batch_size == 3
    assert targs.deepspeed is None
    assert targs.disable_tqdm is True
    assert targs.remove_unused_columns is False
    assert targs.output_dir == str(tmp_path / "out")

    bad = training.parse_args(argv=["--output_dir", str(tmp_path / "out"), "--batch_size", "10",
                                    "--batch_size_per_gpu", "4", "--deepspeed", "none"])
    with pytest.raises(ValueError, match="--batch_size 10"):
        training.training_arguments(bad)


def test_training_arguments_full_fine_tuning_needs_torchrun_for_deepspeed(tmp_path, single_process):
    args = training.parse_args(argv=["--output_dir", str(tmp_path / "out")])
    with pytest.raises(RuntimeError, match="torchrun"):
        training.training_arguments(args)
    lora = training.parse_args(argv=["--output_dir", str(tmp_path / "out"), "--use_lora"])
    assert training.deepspeed_config(lora) is None


def test_load_hf_dataset_never_passes_another_split_off_as_train(tmp_path, datasets_cache):
    """Eval data must not become training data because no train file exists."""
    import datasets

    folder = tmp_path / "eval_only"
    folder.mkdir()
    datasets.Dataset.from_dict({"x": [1]}).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"x": [2]}).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    with pytest.raises(FileNotFoundError, match=r"'test', 'validation'"):
        load_hf_dataset(str(folder), split="train")
    assert list(load_hf_dataset(str(folder), split="test")["x"]) == [2]

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"x": [3]}).save_to_disk(str(single))
    assert list(load_hf_dataset(str(single))["x"]) == [3]  # a lone Dataset is the train split...
    with pytest.raises(ValueError, match="not 'test'"):  # ...and has no other split
        load_hf_dataset(str(single), split="test")


def test_packing_concatenates_samples_with_restarting_positions_and_no_padding(tiny_processor):
    rows = [_sample("What is it?", "A cat.", _image(40, 30)), _sample("Say hi.", "hi"),
            _sample("Compare.", "Same.", _image(30, 40, 1), _image(50, 20, 2))]
    padded = Phi3VDataCollator(tiny_processor, _identity, num_crops=1)(rows)
    packed = Phi3VDataCollator(tiny_processor, _identity, num_crops=1, packing=True)(rows)
    assert "attention_mask" not in packed
    lengths = padded["attention_mask"].sum(1).tolist()
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["input_ids"][0].tolist() == [t for i in range(3) for t in _unpadded(padded, i, "input_ids")]
    assert packed["labels"][0].tolist() == [t for i in range(3) for t in _unpadded(padded, i, "labels")]
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert torch.equal(packed["image_sizes"], padded["image_sizes"])
    starts = [sum(lengths[:i]) for i in range(3)]
    assert all(packed["labels"][0, s] == IGNORE_INDEX for s in starts)  # no sample learns to predict the next one
    assert packed["cu_seq_lens_q"].tolist() == packed["cu_seq_lens_k"].tolist() == [0, *itertools.accumulate(lengths)]
    assert packed["max_length_q"] == packed["max_length_k"] == max(lengths)
    assert pack_batch([Phi3VDataCollator(tiny_processor, _identity, 1).encode(rows[1])]).keys() == {
        "input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def test_length_grouped_batches_have_little_padding(tiny_processor, tmp_path, single_process):
    """The default sampler batches samples of similar token counts (measured at start)."""
    import random

    from phi3v import Phi3VForCausalLM
    from phi3v.tiny import tiny_config

    rng = random.Random(0)
    rows = [_sample(" ".join(["word"] * rng.randint(300, 2400)), "yes" if i % 2 else "no") for i in range(800)]
    kept, lengths = training.filter_by_length(rows, _identity, tiny_processor, 1, None, disable_tqdm=True)

    def padding_fraction(group_by_length: bool) -> float:
        argv = ["--output_dir", str(tmp_path), "--batch_size", "4", "--batch_size_per_gpu", "4", "--deepspeed", "none",
                "--dataloader_num_workers", "0", f"--group_by_length={group_by_length}"]
        args = training.parse_args(argv=argv)
        trainer = training.Phi3VTrainer(
            model=Phi3VForCausalLM(tiny_config()), args=args.training_args,
            train_dataset=training.RowsDataset(rows, kept, lengths),
            data_collator=Phi3VDataCollator(tiny_processor, _identity, num_crops=1),
        )
        masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]
        return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)

    grouped, random_order = padding_fraction(True), padding_fraction(False)
    assert grouped < 0.05 < random_order


def test_filter_by_length_reads_image_sizes_without_decoding_pixels(tiny_processor, tmp_path, monkeypatch):
    """Counting tokens over a datasets.Dataset opens image headers only (documents are big PNGs)."""
    import datasets

    from phi3v.synthetic import make_shapes_dataset

    rows = load_hf_dataset(str(make_shapes_dataset(tmp_path / "shapes", num_train=6, num_eval=0)))

    def cauldron(row):
        turns = [{"user": t["user"], "assistant": t["assistant"], "images": row["images"]} for t in row["texts"]]
        return turns, row["images"]

    expected = [count_tokens(tiny_processor, *cauldron(rows[i])[:1], [im.size for im in rows[i]["images"]], 4)
                for i in range(len(rows))]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(datasets.features.Image, "decode_example", no_decoding)
    kept, lengths = training.filter_by_length(rows, cauldron, tiny_processor, 4, None, disable_tqdm=True)
    assert kept == list(range(len(rows))) and lengths == expected


def test_filter_by_length_on_converted_data_reads_frame_headers_only(tiny_processor, tmp_path, monkeypatch):
    """The ucf101 recipe opens frames lazily: counting tokens over thousands of 8-frame clips decodes nothing."""
    import importlib.util
    import json
    from pathlib import Path

    from PIL import ImageFile

    from phi3v.data import load_jsonl_dataset

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

    expected = [count_tokens(tiny_processor, r["conversations"], [(320, 240)] * (i + 1), 4) for i, r in enumerate(rows)]
    batch = Phi3VDataCollator(tiny_processor, format_row, num_crops=4)(rows)  # the frames decode for training
    assert batch["pixel_values"].shape[0] == 6 and batch["attention_mask"].sum(1).tolist() == expected

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    kept, lengths = training.filter_by_length(rows, format_row, tiny_processor, 4, None, disable_tqdm=True)
    assert kept == [0, 1, 2] and lengths == expected


@pytest.mark.parametrize("group_by_length, packing", [(True, False), (False, False), (False, True)])
def test_training_batches_stay_on_one_side_of_the_longrope_switch(tiny_processor, tmp_path, single_process,
                                                                   group_by_length, packing):
    """A batch whose longest sample passes LongRoPE's switch gives all its samples the long factors."""
    import random

    from phi3v import Phi3VForCausalLM
    from phi3v.tiny import tiny_config

    rng = random.Random(0)
    rows = [_sample(" ".join(["word"] * rng.randint(300, 1700)), "yes") for _ in range(103)]
    kept, lengths = training.filter_by_length(rows, _identity, tiny_processor, 1, None, disable_tqdm=True)
    limit = sorted(lengths)[40]  # 62 samples past the switch
    argv = ["--output_dir", str(tmp_path), "--batch_size", "4", "--batch_size_per_gpu", "4", "--deepspeed", "none",
            "--dataloader_num_workers", "0", f"--group_by_length={group_by_length}", f"--packing={packing}"]
    trainer = training.Phi3VTrainer(
        model=Phi3VForCausalLM(tiny_config(original_max_position_embeddings=limit)),
        args=training.parse_args(argv=argv).training_args,
        train_dataset=training.RowsDataset(rows, kept, lengths),
        data_collator=Phi3VDataCollator(tiny_processor, _identity, num_crops=1, packing=packing),
    )
    batches = []
    for batch in trainer.get_train_dataloader():
        sizes = batch["cu_seq_lens_q"].diff() if packing else batch["attention_mask"].sum(1)
        batches.append(sizes.tolist())
    assert sorted(n for sizes in batches for n in sizes) == sorted(lengths)  # every sample once
    assert max(batches[0]) == max(lengths)  # the longest batch first
    mixed = [sizes for sizes in batches if min(sizes) <= limit < max(sizes)]
    assert mixed in ([], [batches[-1]])  # only the epoch's last batch may hold leftovers of both sides
