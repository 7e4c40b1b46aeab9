"""Answer metrics: exact-match accuracy and ANLS, as the reference recipe scores them.

A metric is `metric(prediction, answers) -> float in 0..1`, `answers` one string or several. A recipe
names one of `METRICS` or passes its own function; "none" (`NO_METRIC`) scores nothing: the answers are
generated and written for reading (free-form answers such as captions, which no string match scores).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

Metric = Callable[[str, str | Sequence[str]], float]


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def normalize_answer(text: str) -> str:
    """The reference recipe's normalisation for accuracy: strip surrounding whitespace and '.', lowercase.

    Only the ends are stripped ("Yes." -> "yes", " no " -> "no", "3.5" stays "3.5").
    """
    return text.strip(string.whitespace + ".").lower()


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0 (see `normalize_answer`)."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in _as_list(answers)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1); O(len(a) * len(b)) time, two rows."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (the DocVQA metric).

    Case-insensitive, with whitespace stripped and internal runs collapsed to one space. For
    each ground truth, NL = levenshtein(a, b) / max(len(a), len(b)) and the score is 1 - NL, or 0
    when NL >= `threshold`; two empty strings score 1. The result is the max over the ground
    truths (0.0 when there are none). Average it over a dataset to get the ANLS.
    """
    predicted = _anls_normalize(prediction)
    best = 0.0
    for answer in _as_list(answers):
        truth = _anls_normalize(answer)
        longest = max(len(predicted), len(truth))
        if longest == 0:
            return 1.0
        distance = levenshtein(predicted, truth) / longest
        best = max(best, 0.0 if distance >= threshold else 1.0 - distance)
    return best


METRICS: dict[str, Metric] = {"anls": anls, "accuracy": exact_match}
NO_METRIC = "none"


def resolve_metric(metric: str | Metric) -> tuple[str, Metric | None]:
    """(name, function) of a metric given by name (a key of `METRICS`, or "none": no function) or as a
    function (named after it)."""
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric == NO_METRIC:
        return metric, None
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS) + [NO_METRIC]} or a function")
    return metric, METRICS[metric]
