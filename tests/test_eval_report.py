"""phivision.eval_report: the page parsed back with html.parser: every example, embedded thumbnails, escaped text."""

import base64
import io
from html.parser import HTMLParser

from helpers import random_image
from PIL import Image

from phivision.eval_report import FRAME, THUMBNAIL, eval_report_html, write_eval_report

INJECTED = "<script>alert('x')</script> What colour?"


def format_example(row):
    return [{"user": row["question"], "assistant": row["answer"]}], row["images"]


ROWS = [
    {"question": INJECTED, "answer": "<b>red</b>", "images": [random_image(400, 300, seed=1)]},
    {"question": "Which sport?", "answer": "Archery", "images": [random_image(320, 240, seed=k) for k in range(8)]},
    {"question": "Say yes.", "answer": "yes", "images": []},
    {"question": "Same colour?", "answer": "no", "images": [random_image(200, 500, seed=9), random_image(50, 40)]},
    {"question": "Not evaluated", "answer": "-", "images": [random_image(64, 64)]},  # beyond --max_eval_samples
]


def summary(predictions: list[str], scores: list[float]) -> dict:
    """What phivision.evaluation writes for the first len(predictions) rows."""
    examples = [{"id": f"row-{i}", "question": ROWS[i]["question"], "answers": [ROWS[i]["answer"]], "prediction": p,
                 "score": s} for i, (p, s) in enumerate(zip(predictions, scores))]
    return {"metric": "accuracy", "score": sum(scores) / len(scores), "num_examples": len(examples), "examples": examples}


BEFORE = summary(["blue", "Bowling", "yes", "no"], [0.0, 0.0, 1.0, 1.0])
AFTER = summary(["<b>red</b>", "Bowling\n<i>again</i>", "", "no"], [1.0, 0.0, 0.0, 1.0])
HISTORY = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.25, "eval_accuracy": 0.5, "step": 2}, {"train_runtime": 1.0, "step": 2}]


class Page(HTMLParser):
    """The tags, the example rows (id, class, image sources) and the text of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.rows, self.text, self.radios = [], [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and "example" in attrs.get("class", "").split():
            self.rows.append({"id": attrs["id"], "class": attrs["class"].split()[1], "images": [], "text": []})
        elif tag == "img":
            self.rows[-1]["images"].append(attrs["src"])
        elif tag == "input":
            self.radios.append(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)
        if self.rows:
            self.rows[-1]["text"].append(data)


def decode(uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))


def test_every_evaluated_example_wrong_answers_first_with_thumbnails_and_escaped_text(tmp_path):
    path = write_eval_report(tmp_path / "eval_report.html", ROWS, format_example, AFTER, BEFORE, HISTORY,
                             title="Evaluation of <out>")
    page = Page(path.read_text(encoding="utf-8"))
    # Wrong after training first (what got worse before what stayed wrong), then right.
    assert [(row["id"], row["class"]) for row in page.rows] == [
        ("example-2", "worse"), ("example-1", "wrong"), ("example-0", "better"), ("example-3", "right")]
    images = {row["id"]: [decode(uri) for uri in row["images"]] for row in page.rows}
    assert [len(images[f"example-{i}"]) for i in range(4)] == [1, 8, 0, 2]  # every frame of the video
    assert images["example-0"][0].format == "JPEG" and images["example-0"][0].size == (THUMBNAIL, 120)
    assert all(max(frame.size) == FRAME for frame in images["example-1"])
    assert images["example-3"][1].size == (50, 40)  # never enlarged
    # Data text is text: no tag comes from it, and it reads back as written.
    assert "script" not in page.tags and "b" not in page.tags and "i" not in page.tags
    first = "".join(page.rows[2]["text"])
    assert INJECTED in first and "<b>red</b>" in first
    assert "Bowling\n<i>again</i>" in "".join(page.rows[1]["text"])
    assert "(empty)" in "".join(page.rows[0]["text"])
    text = "".join(page.text)
    assert "Evaluation of <out>" in text
    for line in ("eval loss", "before training", "50.0%", "during training, step 2", "1.25", "after training", "50.0%"):
        assert line in text
    assert page.radios == ["show-all", "show-worse", "show-wrong", "show-better", "show-right"]
    assert "got worse (1)" in text and "still wrong (1)" in text and "got better (1)" in text


def test_without_an_evaluation_before_training(tmp_path):
    page = Page(eval_report_html(ROWS, format_example, AFTER))
    assert [row["class"] for row in page.rows] == ["wrong", "wrong", "right", "right"]
    assert page.radios == ["show-all", "show-wrong", "show-right"]
    assert all("not evaluated" in "".join(row["text"]) for row in page.rows)
    assert "eval loss" not in "".join(page.text)  # no evaluation during training, no column for it


def test_size_per_example_stays_small():
    """Noise is JPEG's worst case; 500 such examples stay under 6 MB."""
    rows = [{"question": f"q{i}", "answer": "a", "images": [random_image(640, 480, seed=i)]} for i in range(50)]
    after = {"metric": "anls", "score": 0.0, "num_examples": 50,
             "examples": [{"id": i, "question": f"q{i}", "answers": ["a"], "prediction": "b", "score": 0.0}
                          for i in range(50)]}
    html = eval_report_html(rows, format_example, after)
    assert len(html.encode()) < 50 * 12_000


def test_a_photo_stored_sideways_is_shown_upright_as_the_model_sees_it(tmp_path):
    from test_images import sideways_photo

    sideways_photo(tmp_path / "phone.jpg")  # stored 80x40, shown (and given to the model) 40x80
    rows = [{"question": "What is it?", "answer": "a photo", "images": [Image.open(tmp_path / "phone.jpg")]}]
    after = {"metric": "accuracy", "score": 1.0, "num_examples": 1, "examples": [
        {"id": "0", "question": "What is it?", "answers": ["a photo"], "prediction": "a photo", "score": 1.0}]}
    html = eval_report_html(rows, format_example, after)
    (thumbnail,) = Page(html).rows[0]["images"]
    assert decode(thumbnail).size == (40, 80) and 'title="image 1 of 1, 40x80"' in html


def test_a_preference_report_shows_the_rejected_answer_and_the_preference_accuracy():
    """Pairs: the chosen answer is the reference one, the rejected one beside it (text-only rows too); the
    held-out preference accuracy before and after training is in its own table."""

    def pair(row):
        conversation, images = format_example(row)
        return [{**conversation[0], "rejected": f"not {row['answer']}"}], images

    before = {**BEFORE, "preference": {"preference_accuracy": 0.5, "mean_logratio_margin": 0.0, "num_pairs": 4}}
    after = {**AFTER, "preference": {"preference_accuracy": 0.75, "mean_logratio_margin": 1.5, "num_pairs": 4}}
    page = Page(eval_report_html(ROWS, pair, after, before))
    text = "".join(page.text)
    assert "rejected answer" in text and "Preference accuracy on the held-out pairs" in text
    assert "50.0%" in text and "75.0%" in text
    for row in page.rows:
        index = int(row["id"].split("-")[1])
        assert f"not {ROWS[index]['answer']}" in "".join(row["text"])
    assert "rejected answer" not in "".join(Page(eval_report_html(ROWS, format_example, AFTER, BEFORE)).text)
