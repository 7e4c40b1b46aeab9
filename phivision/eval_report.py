"""`eval_report.html`: what the model answered, example by example, before and after training.

One self-contained page that opens from disk in any browser (no script, no file beside it): the
metric before and after training (and during, when the run evaluated while training), then every
evaluated example with its images as small embedded JPEG thumbnails (all frames of a video as a
strip), the question, the reference answer(s), both predictions and their scores. Wrong answers
come first; buttons show only the examples that got better, got worse or are still wrong.

The evaluation files (`eval_before.json`, `eval_after.json`, see `phivision.evaluation`) hold no images:
they come from the evaluated rows, through the recipe's `format_example`. The examples of a summary
are the first rows in order: example i is `format_example(rows[i])`.

    write_eval_report("out/eval_report.html", eval_rows, format_example, after, before, trainer.state.log_history)
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from .chat import FormatExample
from .files import write_atomically
from .images import upright, upright_size
from .training_curves import series

THUMBNAIL = 160  # px, the longer side of an image shown alone or in a pair
FRAME = 80  # px, the longer side of each image of three or more (video frames), shown as a strip
JPEG_QUALITY = 75
REJECTED_CELL = '<td><span class="empty">none</span></td>'  # a row without a rejected answer, in a preference report
# What happened to an example between the two evaluations, in the order the page lists them.
CHANGES = {"worse": "got worse", "wrong": "still wrong", "better": "got better", "right": "right",
           "unscored": "not scored"}

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } ul { margin: 0; padding-left: 1.2em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
.strip { display: flex; gap: 2px; align-items: flex-start; } .strip img { display: block; border: 1px solid #ccc; }
.text { white-space: pre-wrap; max-width: 28em; overflow-wrap: anywhere; }
.score { font-weight: bold; } .empty { color: #999; font-style: italic; }
tr.worse td.change { background: #fdd; } tr.better td.change { background: #dfd; }
tr.wrong td.change { background: #fee9c8; } tr.right td.change { background: #eef6ee; }
input[type=radio] { margin-left: 1em; }
""" + "".join(f"#show-{key}:checked ~ table tr.example:not(.{key}) {{ display: none; }}\n" for key in CHANGES)


def thumbnail_uri(image: Image.Image, max_side: int) -> str:
    """`image`, upright as the model saw it (EXIF orientation), scaled down to fit `max_side` x `max_side`, as a
    `data:image/jpeg;base64,...` URI."""
    small = upright(image).convert("RGB")  # a copy: the caller's image stays as it was
    small.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def change(before: float | None, after: float | None) -> str:
    """A key of CHANGES: "better"/"worse" when the score moved, else "wrong" (under 1) or "right";
    "unscored" without a score (metric "none")."""
    if after is None:
        return "unscored"
    if before is not None and after > before:
        return "better"
    if before is not None and after < before:
        return "worse"
    return "right" if after >= 1 else "wrong"


def _text(value: str) -> str:
    return f'<div class="text">{escape(value)}</div>' if value.strip() else '<span class="empty">(empty)</span>'


def _prediction(example: dict | None) -> str:
    if example is None:
        return '<span class="empty">not evaluated</span>'
    score = "" if example["score"] is None else f'<div class="score">score {example["score"]:.2f}</div>'
    return f'{_text(example["prediction"])}{score}'


def _images(images: Sequence[Image.Image]) -> str:
    side = THUMBNAIL if len(images) <= 2 else FRAME
    tags = [f'<img src="{thumbnail_uri(image, side)}" alt="image {k}" title="image {k} of {len(images)}, '
            f'{"x".join(map(str, upright_size(image)))}">' for k, image in enumerate(images, 1)]
    return f'<div class="strip">{"".join(tags)}</div>' if tags else '<span class="empty">no image</span>'


def _row_and_id(index: int, row_id: Any) -> str:
    return str(index) if str(row_id) == str(index) else f"{index}<br><small>{escape(str(row_id))}</small>"


def _percent(score: float | None) -> str:
    return "-" if score is None else f"{100 * score:.1f}%"


def _preference(before: dict | None, after: dict) -> str:
    """A preference run's accuracy on the held-out pairs before and after training (nothing for other runs)."""
    results = [(when, summary.get("preference")) for when, summary in (("before", before or {}), ("after", after))]
    cells = [f"<tr><td>{when} training</td><td>{_percent(result['preference_accuracy'])}</td>"
             f"<td>{result['num_pairs']}</td></tr>" for when, result in results if result]
    if not cells:
        return ""
    return ("<h2>Preference accuracy on the held-out pairs</h2><p>The policy's log-prob ratio against the reference "
            "favours the chosen answer (a tie counts half).</p><table><tr><th>evaluated</th><th>accuracy</th>"
            f"<th>pairs</th></tr>{''.join(cells)}</table>")


def _summary(metric: str, before: dict | None, after: dict, log_history: Sequence[dict]) -> str:
    """The metric before, during and after training, as a table."""
    rows = [("before training", _percent(before["score"] if before else None), "")]
    steps, scores = series(log_history, f"eval_{metric}")
    losses = dict(zip(*series(log_history, "eval_loss")))
    rows += [(f"during training, step {step}", _percent(score), f"{losses[step]:.4g}" if step in losses else "")
             for step, score in zip(steps, scores)]
    rows.append(("after training", _percent(after["score"]), ""))
    columns = 3 if losses else 2  # the evaluation loss is measured during training only
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row[:columns]) + "</tr>" for row in rows)
    header = "".join(f"<th>{cell}</th>" for cell in ("evaluated", escape(metric), "eval loss")[:columns])
    return f"<table><tr>{header}</tr>{body}</table>"


def _matching(before: dict | None, after: dict) -> list[dict | None]:
    """The before-training example of each after-training one (None where there is none: other rows)."""
    earlier = (before or {}).get("examples", [])
    return [earlier[i] if i < len(earlier) and (earlier[i]["id"], earlier[i]["question"]) == (e["id"], e["question"])
            else None for i, e in enumerate(after["examples"])]


def eval_report_html(rows: Sequence[Any], format_example: FormatExample, after: dict, before: dict | None = None,
                     log_history: Sequence[dict] = (), title: str = "Evaluation report") -> str:
    """The page (see the module docstring): `after`/`before` are evaluation summaries of the first rows."""
    metric, examples, earlier = after["metric"], after["examples"], _matching(before, after)
    changes = [change(b["score"] if b else None, a["score"]) for b, a in zip(earlier, examples)]
    order = sorted(range(len(examples)),
                   key=lambda i: (examples[i]["score"] or 0.0, list(CHANGES).index(changes[i]), i))
    if after["score"] is None:
        labels = {"unscored": CHANGES["unscored"]}
    else:  # without an evaluation before training there is nothing to compare with
        labels = {k: v for k, v in CHANGES.items() if k != "unscored"} if before else {"wrong": "wrong", "right": "right"}
    table, any_rejected = [], False
    for i in order:
        conversation, images = format_example(rows[examples[i].get("row", i)])  # unreadable rows have no example
        answers = "".join(f"<li>{escape(answer)}</li>" for answer in examples[i]["answers"])
        rejected = conversation[-1].get("rejected")  # a preference pair's rejected answer
        any_rejected = any_rejected or rejected is not None
        table.append(
            f'<tr class="example {changes[i]}" id="example-{i}">'
            f"<td>{_row_and_id(examples[i].get('row', i), examples[i]['id'])}</td>"
            f"<td>{_images(list(images))}</td><td>{_text(examples[i]['question'])}</td><td><ul>{answers}</ul></td>"
            + (REJECTED_CELL if rejected is None else f"<td>{_text(rejected)}</td>") +
            f"<td>{_prediction(earlier[i])}</td><td>{_prediction(examples[i])}</td>"
            f'<td class="change">{labels[changes[i]]}</td></tr>'
        )
    buttons = [f'<input type="radio" name="show" id="show-all" checked><label for="show-all">all ({len(changes)})</label>']
    buttons += [f'<input type="radio" name="show" id="show-{key}"><label for="show-{key}">{label} '
                f'({changes.count(key)})</label>' for key, label in labels.items()]
    if any_rejected:
        header = ("<tr><th>row / id</th><th>image(s)</th><th>question</th><th>chosen answer</th>"
                  "<th>rejected answer</th><th>before training</th><th>after training</th><th>change</th></tr>")
    else:
        table = [row.replace(REJECTED_CELL, "") for row in table]
        header = ("<tr><th>row / id</th><th>image(s)</th><th>question</th><th>reference answer(s)</th>"
                  "<th>before training</th><th>after training</th><th>change</th></tr>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n"
        f"{_summary(metric, before, after, log_history)}\n{_preference(before, after)}\n"
        f"<h2>{len(changes)} examples, wrong answers first</h2>\n<main>Show: {''.join(buttons)}\n"
        f"<table>{header}\n" + "\n".join(table) + "\n</table></main></body></html>\n"
    )


def write_eval_report(path: str | Path, rows: Sequence[Any], format_example: FormatExample, after: dict,
                      before: dict | None = None, log_history: Sequence[dict] = (),
                      title: str = "Evaluation report") -> Path:
    """Writes `eval_report_html(...)` to `path` (atomically); returns `path`."""
    page = eval_report_html(rows, format_example, after, before, log_history, title)
    write_atomically(path, lambda f: f.write(page))
    return Path(path)
