"""LLaVA / ShareGPT conversations, the JSON most image-instruction data comes in, read as converted records.

    [{"id": "q1", "image": "coco/0001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"}, {"from": "gpt", "value": "A cat."}]},
     ...]

- `image`: one path, a list of paths (several images), or absent (text only); paths are relative to the
  image folder, as in the converted format (no absolute paths, no '..').
- `conversations`: messages that alternate human and gpt ("user" and "assistant" also do), human first and
  gpt last. A "system" message is refused: the recipes train without a system prompt.
- Each `<image>` in a human message becomes the next numbered tag (`<|image_1|>`, `<|image_2|>`, ...) and
  its image belongs to that turn; a record without any `<image>` gets all its images before its first question.

The file is a JSON list (`.json`); the same records also come one per line in a `.jsonl` file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..chat import image_tag
from .converted import NumberedRecords, Problem, image_path_problem

PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace


def is_llava_record(record: Any) -> bool:
    """Whether a JSON record has LLaVA's form (messages with "from"), not the converted one (turns)."""
    messages = record.get("conversations") if isinstance(record, dict) else None
    return isinstance(messages, list) and any(isinstance(m, dict) and "from" in m for m in messages)


def placeholders_to_tags(text: str, first_image: int) -> tuple[str, int]:
    """`text` with every `<image>` turned into the next tag from `<|image_{first_image}|>` on, and how many."""
    pieces = text.split(PLACEHOLDER)
    tagged = pieces[0] + "".join(image_tag(first_image + k) + piece for k, piece in enumerate(pieces[1:]))
    return tagged, len(pieces) - 1


def tagged_question(question: str, num_images: int) -> str:
    """A one-turn sample's question with its `<image>` placeholders as tags (ValueError unless it has none, or one
    per image)."""
    question, placeholders = placeholders_to_tags(question, 1)
    if placeholders not in (0, num_images):
        raise ValueError(f"'question' has {placeholders} {PLACEHOLDER} placeholder(s) but the row has "
                         f"{num_images} image(s)")
    return question


def image_field(record: dict) -> list[str]:
    """The paths of a record's "image" (one path, a list of paths, or absent), each checked (ValueError)."""
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise ValueError(f"'image' must be a path or a list of paths, got {images!r:.80}")
    for path in images:
        problem = image_path_problem(path)
        if problem:
            raise ValueError(f"'image': {problem}")
    return images


def convert_llava_record(record: Any) -> dict:
    """A LLaVA / ShareGPT record as a converted record (see `phivision.data.converted`).

    Raises ValueError saying what is wrong, in the record's own terms (`conversations[3]` is its fourth message).
    """
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "video" in record:
        raise ValueError("'video' records are not supported: turn each clip into frames (convert_ucf101.py) "
                         "and list them under 'image'")
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'conversations' must be a non-empty list of {{\"from\", \"value\"}} messages, "
                         f"got {messages!r:.80}")
    images = image_field(record)
    turns: list[dict] = []
    used = 0
    for m, message in enumerate(messages):
        where = f"conversations[{m}]"
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise ValueError(f"{where} must be {{\"from\": ..., \"value\": text}}, got {message!r:.80}")
        sender, text = message.get("from"), message["value"]
        role = ROLES.get(sender)
        if role is None:
            why = ": the recipes train without a system prompt" if sender == "system" else ""
            raise ValueError(f"{where}: 'from' {sender!r} is not human or gpt (user or assistant){why}")
        expected = "user" if m % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"{where} is a {sender!r} message where a {'human' if m % 2 == 0 else 'gpt'} one was "
                             "expected: messages alternate human, gpt, human, gpt, ...")
        if role == "user":
            user, count = placeholders_to_tags(text, used + 1)
            turns.append({"images": images[used:used + count], "user": user} if count else {"user": user})
            used += count
        elif PLACEHOLDER in text:
            raise ValueError(f"{where}: {PLACEHOLDER} in a gpt message (placeholders belong in human messages)")
        elif not text.strip():
            raise ValueError(f"{where}: the gpt answer is empty: nothing to learn")
        else:
            turns[-1]["assistant"] = text
    if "assistant" not in turns[-1]:
        raise ValueError(f"conversations[{2 * len(turns) - 2}]: the last human message has no gpt answer after it")
    if used == 0 and images:
        turns[0] = {"images": images, **turns[0]}  # no placeholders: the images go before the first question
    elif used != len(images):
        raise ValueError(f"{used} {PLACEHOLDER} placeholder(s) but {len(images)} image(s): write one {PLACEHOLDER} "
                         "per image, or none (the images then go before the first question)")
    converted = {"conversations": turns}
    if "id" in record:
        converted = {"id": record["id"], **converted}
    return converted


def read_json_list(path: str | Path) -> NumberedRecords:
    """The records of a file holding one JSON list, each with the line it starts on and its position.

    A file that is not a JSON list gives one Problem (with the line of a syntax error).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return [(None, None, Problem(str(path), None, f"not UTF-8 text ({e})"))]
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if text[position:position + 1] != "[":
        return [(None, None, Problem(str(path), None, "expected a JSON list of records ([{...}, {...}]) as LLaVA "
                                                       "data is; one record per line goes in a .jsonl file"))]
    items: NumberedRecords = []
    line, counted = 1, 0  # line of text[counted]
    position = _skip_space(text, position + 1)
    while text[position:position + 1] not in ("]", ""):
        line += text.count("\n", counted, position)
        counted = position
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            problem = Problem(str(path), e.lineno, f"not valid JSON ({e.msg}, column {e.colno})")
            return items + [(e.lineno, None, problem)]
        items.append((line, len(items), record))
        position = _skip_space(text, position)
        if text[position:position + 1] == ",":
            position = _skip_space(text, position + 1)
        elif text[position:position + 1] != "]":
            break
    if text[position:position + 1] != "]" or text[position + 1:].strip():
        bad = text.count("\n", 0, position) + 1
        items.append((bad, None, Problem(str(path), bad, "not valid JSON: expected ',' or ']' after a record")))
    return items


def _skip_space(text: str, position: int) -> int:
    return _SPACE.match(text, position).end()
