"""Small helpers shared by several test files (pytest puts this folder on sys.path)."""

import numpy as np
from PIL import Image


def image_runs(ids: list[int]) -> list[tuple[int, int]]:
    """(value, length) of each run of image ids (< 0)."""
    runs = []
    for i in ids:
        if i < 0 and runs and runs[-1][0] == i:
            runs[-1] = (i, runs[-1][1] + 1)
        elif i < 0:
            runs.append((i, 1))
    return runs


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def identity(row):
    """Rows that are already (conversation, images)."""
    return row


def sample(question: str, answer: str, *images: Image.Image):
    """A single-turn (conversation, images) whose images all belong to the one turn."""
    turn = {"user": question, "assistant": answer}
    if images:
        turn["images"] = list(images)
    return [turn], list(images)
