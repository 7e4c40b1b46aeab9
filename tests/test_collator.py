"""Training batches: labels on answers only, right padding, packing, images in order, token counts."""

import itertools

import pytest
import torch
from helpers import identity, image_runs, random_image, sample
from PIL import Image

from phivision.collator import DataCollator, pack_batch
from phivision.processor_parts import IGNORE_INDEX


PROMPT = "<|user|>\n{}<|end|>\n<|assistant|>\n"


END = "<|end|>\n"


FINAL = "<|end|>\n<|endoftext|>"


SMALL = random_image(40, 30, seed=1)


LARGE = random_image(400, 300, seed=2)


TALL = random_image(300, 400, seed=3)


def _tokens(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _num_tokens(processor, image: Image.Image, num_crops: int) -> int:
    return processor.image_processor.num_image_tokens(*image.size, num_crops)


def _unpadded(batch, i: int, key: str) -> list[int]:
    n = int(batch["attention_mask"][i].sum())
    return batch[key][i, :n].tolist()


def test_single_turn_labels_only_the_answer(tiny_processor):
    question, answer = "What is shown in this image?", "A red square."
    batch = DataCollator(tiny_processor, identity, num_crops=4)([sample(question, answer, LARGE)])
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
        sample("Is this meme hateful?", "No, it is not.", SMALL),
        sample("Describe the picture in one sentence.", "A small dog is sitting on the grass next to a blue ball.",
                LARGE),
        sample("Answer briefly.", "yes"),
    ]
    batch = DataCollator(tiny_processor, identity, num_crops=4)(samples)
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
    batch = DataCollator(tiny_processor, identity, num_crops=4)([sample(question, answer, *images)])
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
    batch = DataCollator(tiny_processor, identity, num_crops=4)([(turns, [LARGE, SMALL, TALL])])
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
    collator = DataCollator(tiny_processor, identity, num_crops=1)
    turns = [{"user": "Look: <|image_1|> and <|image_2|>.", "assistant": "ok", "images": [SMALL, LARGE]}]
    ids = collator([(turns, [SMALL, LARGE])])["input_ids"][0].tolist()
    counts = [_num_tokens(tiny_processor, im, 1) for im in (SMALL, LARGE)]
    prompt = tiny_processor.encode_prompt(PROMPT.format("Look: <|image_1|> and <|image_2|>."), counts)
    assert ids == prompt + _tokens(tiny_processor, "ok" + FINAL)
    # Turns that do not say which images are theirs: all go to the first turn, as in evaluation.
    unsaid = collator([([{"user": "hi", "assistant": "ok"}, {"user": "and?", "assistant": "yes"}], [SMALL])])
    said = collator([([{"user": "hi", "assistant": "ok", "images": [SMALL]}, {"user": "and?", "assistant": "yes"}],
                      [SMALL])])
    assert torch.equal(unsaid["input_ids"], said["input_ids"]) and torch.equal(unsaid["labels"], said["labels"])
    # Turns that do say must hold exactly the images given.
    with pytest.raises(ValueError, match="1 image\\(s\\) in all but 2"):
        collator([([{"user": "hi", "assistant": "ok", "images": [SMALL]}], [SMALL, LARGE])])


def test_mixed_batch_of_text_only_and_image_samples(tiny_processor):
    collator = DataCollator(tiny_processor, identity, num_crops=4)
    samples = [
        sample("What is shown in this image?", "A square.", LARGE),
        sample("Hello world!", "How are you today?"),
        sample("Compare the two images.", "Both have a tree.", TALL, SMALL),
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

    text_only = collator([sample("Hello world!", "Hi."), sample("Answer briefly.", "yes")])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}
    assert (text_only["input_ids"] >= 0).all()


def test_num_crops_changes_only_the_image_runs(tiny_processor):
    samples = [
        sample("Compare the two images.", "The first one is brighter.", LARGE, TALL),
        sample("What is shown in this image?", "A small dog.", SMALL),
    ]
    four = DataCollator(tiny_processor, identity, num_crops=4)(samples)
    one = DataCollator(tiny_processor, identity, num_crops=1)(samples)
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


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_count_tokens_equals_collated_length(tiny_processor, num_crops):
    sizes = [(40, 30), (30, 40), (400, 300), (336, 336), (1000, 120), (120, 1000), (2000, 10), (700, 500)]
    samples = [sample("What is shown in this image?", "A dog.", random_image(w, h)) for w, h in sizes]
    samples.append(sample("Compare the two images.", "The left one.", random_image(700, 500), random_image(40, 30)))
    samples.append(([{"user": "What is it?", "assistant": "A cat.", "images": [random_image(500, 700)]},
                     {"user": "And this?", "assistant": "A dog.", "images": [random_image(90, 60)]}],
                    [random_image(500, 700), random_image(90, 60)]))
    samples.append(sample("Hello world!", "Hi."))
    collator = DataCollator(tiny_processor, identity, num_crops=num_crops)
    for turns, images in samples:
        n = tiny_processor.num_conversation_tokens(turns, [im.size for im in images], num_crops)
        batch = collator([(turns, images)])
        assert n == batch["input_ids"].shape[1], ([im.size for im in images], num_crops)


def test_packing_concatenates_samples_with_restarting_positions_and_no_padding(tiny_processor):
    rows = [sample("What is it?", "A cat.", random_image(40, 30)), sample("Say hi.", "hi"),
            sample("Compare.", "Same.", random_image(30, 40, 1), random_image(50, 20, 2))]
    padded = DataCollator(tiny_processor, identity, num_crops=1)(rows)
    packed = DataCollator(tiny_processor, identity, num_crops=1, packing=True)(rows)
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
    assert pack_batch([DataCollator(tiny_processor, identity, 1).encode(rows[1])], tiny_processor.batch_images).keys() == {
        "input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def test_phi4mm_packed_row_gives_the_loss_and_gradients_of_the_padded_batch(tiny_phi4mm):
    """Our collator's packed row through Phi-4-MM's training loss (what the Trainer's compute_loss calls), on the
    model as a --packing run loads it, equals the same samples padded: no sample sees another."""
    from phivision.attention import training_attention
    from phivision.families import family_of

    family = family_of(str(tiny_phi4mm))
    processor = family.load_processor(str(tiny_phi4mm))
    model = family.model_class().from_pretrained(tiny_phi4mm, dtype=torch.float32,
                                                 attn_implementation=training_attention(False, packing=True))
    model = family.as_it_runs_on_images(model, str(tiny_phi4mm))
    family.prepare_for_training(model)
    model.train()
    rows = [sample("What is it?", "A cat.", random_image(40, 30)), sample("Say hi.", "hi there"),
            sample("Compare.", "Same.", random_image(30, 40, 1), random_image(50, 20, 2))]
    losses, gradients = [], []
    for packing in (False, True):
        batch = DataCollator(processor, identity, num_crops=1, packing=packing)(rows)
        model.zero_grad()
        loss = family.training_loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # the last one was packed
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    padded, packed = gradients
    assert packed.keys() == padded.keys() and any(".image_embed." in n for n in packed)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-6)
