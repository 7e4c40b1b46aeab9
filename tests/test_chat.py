"""phivision.chat: prompt layout, image tags and stop tokens, in one place for training, evaluation and generation."""

import pytest

from phivision.chat import (ImageTagList, Phi3VChat, conversation_prompt, generation_prompt, image_tag_problem,
                        images_per_turn, stop_token_ids, user_turn)

PHI3V = Phi3VChat()


def test_generation_prompt():
    assert generation_prompt("What is it?", 0, PHI3V) == "<|user|>\nWhat is it?<|end|>\n<|assistant|>\n"
    assert generation_prompt("Same?", 2, PHI3V) == "<|user|>\n<|image_1|>\n<|image_2|>\nSame?<|end|>\n<|assistant|>\n"
    tagged = "Left <|image_1|> right <|image_2|>: same?"
    assert generation_prompt(tagged, 2, PHI3V) == f"<|user|>\n{tagged}<|end|>\n<|assistant|>\n"


def test_conversation_prompt_renders_history_and_ends_with_the_generation_prompt():
    conversation = [{"user": "Q1", "assistant": "A1"}, {"user": "Q2", "assistant": "A2"}]
    assert conversation_prompt(conversation, 1, PHI3V) == (
        "<|user|>\n<|image_1|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n"
    )
    assert conversation_prompt(conversation[1:], 1, PHI3V) == generation_prompt("Q2", 1, PHI3V)
    tagged = [{"user": "Q1", "assistant": "A1"}, {"user": "<|image_1|>Q2", "assistant": "A2"}]
    assert conversation_prompt(tagged, 1, PHI3V) == (
        "<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\n<|image_1|>Q2<|end|>\n<|assistant|>\n"
    )
    with pytest.raises(ValueError):
        conversation_prompt([], 0, PHI3V)


def test_conversation_prompt_with_images_per_turn_numbers_tags_across_turns():
    conversation = [
        {"user": "Q1", "assistant": "A1", "images": ["a", "b"]},
        {"user": "Q2", "assistant": "A2", "images": []},
        {"user": "Q3", "assistant": "A3", "images": ["c"]},
    ]
    assert conversation_prompt(conversation, 3, PHI3V) == (
        "<|user|>\n<|image_1|>\n<|image_2|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n"
        "<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n"
        "<|user|>\n<|image_3|>\nQ3<|end|>\n<|assistant|>\n"
    )
    with pytest.raises(ValueError, match="image"):
        conversation_prompt(conversation, 2, PHI3V)


def test_user_turn_is_the_tokenizer_chat_templates_layout(tiny_processor):
    """The layout we write by hand is the one the tokenizer's chat template renders."""
    rendered = tiny_processor.tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                                             add_generation_prompt=True)
    assert rendered == user_turn("Hi?")


@pytest.mark.parametrize("text, num_images, first, problem", [
    ("<|image_1|>\nA?", 1, 1, None),
    ("<|image_3|> and <|image_4|>", 2, 3, None),
    ("A?", 0, 1, None),
    ("<|image_1|> <|image_2|>", 1, 1, "it has 2 image tag(s) (<|image_1|>, <|image_2|>) but 1 image(s)"),
    ("<|image_1|>", 0, 1, "Expected no image tags"),
    ("<|image_2|> <|image_1|>", 2, 1, "its tags are <|image_2|>, <|image_1|>"),
    ("<|image_1|> <|image_1|>", 2, 1, "tag <|image_1|> appears more than once"),
    ("<|image_1|>", 1, 2, "Expected the tags <|image_2|>"),
])
def test_image_tag_problem(text, num_images, first, problem):
    found = image_tag_problem(text, num_images, first)
    assert (found is None) if problem is None else (problem in found)


def test_images_per_turn():
    assert images_per_turn([{"user": "A"}, {"user": "B"}], 2) == [2, 0]  # no say: the first turn
    assert images_per_turn([{"user": "A"}, {"user": "B <|image_1|>"}], 1) == [0, 1]  # the tags say
    assert images_per_turn([{"user": "A", "images": ["x"]}, {"user": "B", "images": ["y", "z"]}], 3) == [1, 2]
    with pytest.raises(ValueError, match="2 image"):
        images_per_turn([{"user": "A", "images": ["x", "y"]}], 3)
    with pytest.raises(ValueError, match="no turns"):
        images_per_turn([], 0)


def test_stop_token_ids(tiny_processor, hub_processor):
    tokenizer = hub_processor.tokenizer
    assert stop_token_ids(tokenizer) == [32007, 32000]  # <|end|>, <|endoftext|> of Phi-3.5-vision
    tiny = tiny_processor.tokenizer
    assert stop_token_ids(tiny) == [tiny.convert_tokens_to_ids("<|end|>"), tiny.convert_tokens_to_ids("<|endoftext|>")]


def test_image_tag_list_is_the_original_processors_img_tokens():
    """A million tags, made on demand, indexed and sliced as the original's list (vLLM does both)."""
    tags = ImageTagList()
    assert tags[0] == "<|image_1|>" and tags[:3] == ["<|image_1|>", "<|image_2|>", "<|image_3|>"]
    assert len(tags) == 1_000_000 and tags[-1] == "<|image_1000000|>" and tags[4:8:2] == ["<|image_5|>", "<|image_7|>"]
    with pytest.raises(IndexError):
        tags[1_000_000]
