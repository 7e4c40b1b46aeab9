"""What a run leaves for a person to look at when it ends, in --output_dir (main process only):
`training_curves.png`, `eval_report.html`, an example image for the closing "Try it with" command and the
images of the first evaluated examples (`eval_examples/`, which `python -m phivision.web` offers)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..chat import FormatExample
from ..eval_report import write_eval_report
from ..data.rows import UNREADABLE
from ..files import write_atomically, write_json
from ..images import model_image
from ..training_curves import write_training_curves
from .arguments import RecipeArguments

EXAMPLE_IMAGE = "example_image.jpg"
EVAL_EXAMPLES = "eval_examples"  # the folder; its index.json maps each saved example's row to its image files
EVAL_EXAMPLES_INDEX = "index.json"


def write_pictures(args: RecipeArguments, log_history: Sequence[dict], eval_rows: Sequence[Any],
                   format_example: FormatExample, after: dict | None) -> tuple[Path, Path | None]:
    """Writes training_curves.png and eval_report.html; returns their paths (the report's None without one).

    `after` is the summary of the evaluation after training (None: the run had no evaluation rows, so it
    draws the training curves only); the one before training is read from eval_before.json, which the
    launch that started the run may have written (a resumed run).
    """
    output_dir = Path(args.training.output_dir)
    before_file = output_dir / "eval_before.json"
    before = None if args.data.skip_eval_before or not before_file.is_file() else json.loads(before_file.read_text())
    curves = write_training_curves(output_dir / "training_curves.png", log_history, after and after["metric"],
                                   before["score"] if before else None, after and after["score"],
                                   title=f"Training of {output_dir}")
    if after is None:
        return curves, None
    report = write_eval_report(output_dir / "eval_report.html", eval_rows, format_example, after, before,
                               log_history, title=f"Evaluation of {output_dir}")
    return curves, report


def save_example_image(rows: Sequence[Any], format_example: FormatExample, output_dir: str | Path,
                       max_rows: int = 50) -> str | None:
    """The first image of the first rows (within `max_rows`) saved as output_dir/example_image.jpg; its path.

    The data may live in a dataset's Arrow files, or on the Hub: this gives the closing command an
    image file that exists. None when those rows have no image.
    """
    for index in range(min(len(rows), max_rows)):
        _, images = format_example(rows[index])
        if images:
            path = Path(output_dir) / EXAMPLE_IMAGE
            image = images[0].convert("RGB")
            write_atomically(path, lambda f: image.save(f, format="JPEG", quality=95), binary=True)
            return str(path)
    return None


def save_eval_examples(rows: Sequence[Any], format_example: FormatExample, after: dict, output_dir: str | Path,
                       max_examples: int = 16) -> Path:
    """The images of the first `max_examples` examples of `after` (the evaluation after training), saved losslessly
    as output_dir/eval_examples/{row}.{k}.png, with index.json: {row: [its image files]} ([] for a text-only row).

    eval_after.json holds no images (the rows may live in Arrow files or on the Hub): these let the web page ask
    the model the evaluated questions again. Rows whose images cannot be read are left out. Returns the folder.
    """
    folder = Path(output_dir) / EVAL_EXAMPLES
    shutil.rmtree(folder, ignore_errors=True)  # a resumed run's earlier examples
    folder.mkdir(parents=True)
    index: dict[str, list[str]] = {}
    for example in after["examples"][:max_examples]:
        row = int(example["row"])
        try:
            images = [model_image(image) for image in format_example(rows[row])[1]]
        except UNREADABLE:
            continue
        names = [f"{row}.{k}.png" for k in range(len(images))]
        for name, image in zip(names, images):
            write_atomically(folder / name, lambda f, image=image: image.save(f, format="PNG"), binary=True)
        index[str(row)] = names
    write_json(folder / EVAL_EXAMPLES_INDEX, index)
    return folder
