"""The conversation a sample is, and how Phi-3-V lays it out as text: turns, image tags, stop tokens.

A recipe describes each of its rows with `format_example(row) -> (conversation, images)`:

- `conversation`: a list of turns `{"user": str, "assistant": str}`. A turn may also carry
  `"images"`: the images that belong to it, which says where they go in a multi-turn
  conversation; without any `"images"` key the images belong to the turns whose texts tag them,
  or else all to the first turn. The last turn may
  carry `"answers"`: several correct answers for evaluation (DocVQA), the first of which is usually
  its "assistant". A preference row (DPO, `phivision.data.preference`) is such a conversation whose last
  turn also carries `"rejected"`: the rejected answer (a str), its "assistant" being the chosen one, so
  that every supervised tool (token counts, evaluation against the reference answer) sees the chosen
  answer; the rejected sequence is the same conversation with that "assistant" replaced by "rejected".
- `images`: every image of the conversation in order (image 1, 2, ...): PIL images, or files
  opened but not decoded (token counting then reads only their headers). Empty for text-only rows.

In a user text, `<|image_N|>` tags place the turn's images (each image once, in order, numbered
over the whole conversation); a text without tags gets its turn's tags first, one per line.
Training learns the answers only; evaluation answers the last turn and scores it.

How the turns are laid out as text differs per model family: its processor's `user_turn` and
`answer_turn` (Phi-3-V's are the functions of the same names here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
# Chat answers end with <|end|>; <|endoftext|> ends a training sample.
STOP_TOKENS = ("<|end|>", "<|endoftext|>")

Conversation = list[dict[str, Any]]
FormatExample = Callable[[Any], tuple[Conversation, Sequence[Any]]]


class ChatLayout(Protocol):
    """A model family's text layout of one exchange (its processor has these methods)."""

    def user_turn(self, user: str) -> str: ...

    def answer_turn(self, assistant: str) -> str: ...


def user_turn(user: str) -> str:
    """Phi-3-V: a user turn and the start of the answer: the prompt of one exchange."""
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n"


def answer_turn(assistant: str) -> str:
    """Phi-3-V: an answer as it follows its `user_turn` (the last answer of a sample also gets <|endoftext|>)."""
    return f"{assistant}<|end|>\n"


class Phi3VChat:
    """Phi-3-V's layout as a `ChatLayout` (Phi3VProcessor answers the same)."""

    user_turn = staticmethod(user_turn)
    answer_turn = staticmethod(answer_turn)


def image_tag(number: int) -> str:
    """The tag of image `number` (counted from 1): `<|image_1|>`, `<|image_2|>`, ..."""
    return f"<|image_{number}|>"


class ImageTagList(Sequence[str]):
    """`[<|image_1|>, <|image_2|>, ...]`, made on demand: the original processor's `img_tokens` (a list of a
    million tags), which serving runtimes index and slice."""

    def __init__(self, length: int = 1_000_000) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        numbers = range(1, self.length + 1)[index]
        return [image_tag(n) for n in numbers] if isinstance(numbers, range) else image_tag(numbers)


def image_tags(first_image: int, count: int) -> str:
    """`<|image_k|>\\n` for images first_image .. first_image + count - 1."""
    return "".join(image_tag(first_image + k) + "\n" for k in range(count))


def format_tags(numbers: Sequence[int]) -> str:
    return ", ".join(image_tag(n) for n in numbers) or "none"


def image_tag_problem(text: str, num_images: int, first_image: int = 1) -> str | None:
    """Why the tags of `text` do not name images first_image .. first_image + num_images - 1, each once
    and in order (None when they do)."""
    numbers = [int(n) for n in IMAGE_TAG.findall(text)]
    expected = list(range(first_image, first_image + num_images))
    if numbers == expected:
        return None
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        problem = f"tag {format_tags(repeated)} appears more than once (use one tag per image)"
    elif len(numbers) != num_images:
        problem = f"it has {len(numbers)} image tag(s) ({format_tags(numbers)}) but {num_images} image(s)"
    else:
        problem = f"its tags are {format_tags(numbers)}"
    wanted = (f"the tags {format_tags(expected)}, each once and in this order (images are numbered over the "
              f"whole conversation and filled in order)" if expected else "no image tags")
    return f"{problem}. Expected {wanted}"


def with_image_tags(user: str, first_image: int, count: int) -> str:
    """`user` with its turn's image tags put first when it has none of its own."""
    return user if IMAGE_TAG.search(user) else image_tags(first_image, count) + user


def images_per_turn(conversation: Sequence[dict[str, Any]], num_images: int) -> list[int]:
    """How many of the conversation's images belong to each turn (see the module docstring)."""
    if not conversation:
        raise ValueError("the conversation has no turns")
    if any("images" in turn for turn in conversation):
        counts = [len(turn.get("images") or []) for turn in conversation]
        if sum(counts) != num_images:
            raise ValueError(f"the turns have {sum(counts)} image(s) in all but {num_images} image(s) were given")
        return counts
    tags = [len(IMAGE_TAG.findall(turn.get("user", ""))) for turn in conversation]
    if any(tags) and sum(tags) == num_images:  # the tags say which turn each image belongs to
        return tags
    return [num_images] + [0] * (len(conversation) - 1)


def conversation_prompt(conversation: Sequence[dict[str, Any]], num_images: int, layout: ChatLayout) -> str:
    """The prompt that asks for the last turn's answer: earlier turns as history, tags as in training,
    in the `layout` of the model's family (its processor)."""
    parts, first_image = [], 1
    counts = images_per_turn(conversation, num_images)
    for index, (turn, count) in enumerate(zip(conversation, counts)):
        parts.append(layout.user_turn(with_image_tags(turn["user"], first_image, count)))
        if index < len(conversation) - 1:
            parts.append(layout.answer_turn(turn["assistant"]))
        first_image += count
    return "".join(parts)


def generation_prompt(user: str, num_images: int, layout: ChatLayout) -> str:
    """The prompt of one question about `num_images` images."""
    return conversation_prompt([{"user": user}], num_images, layout)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of the `STOP_TOKENS` in this tokenizer (its EOS if it has neither)."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != unk and token_id not in ids:
            ids.append(token_id)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
