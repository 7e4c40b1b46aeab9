"""phivision.metrics against hand-computed values."""

import pytest

from phivision.metrics import METRICS, anls, exact_match, levenshtein, normalize_answer, resolve_metric


@pytest.mark.parametrize(
    "a, b, distance",
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("", "", 0), ("same", "same", 0),
     ("abcdefghij", "abcdefghix", 1), ("ab", "ba", 2)],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("hello world", "hello world", 1.0),  # exact
        ("  Hello   WORLD ", "hello world", 1.0),  # case and whitespace
        ("hello\tworld\n", ["Hello World"], 1.0),
        ("abcdefghix", "abcdefghij", 0.9),  # one substitution in 10 characters
        ("abcdefghi", "abcdefghij", 0.9),  # one deletion
        ("abc", "abcd", 0.75),  # NL = 1/4
        ("abcdef", "abcxyz", 0.0),  # NL = 3/6 = 0.5 >= threshold -> 0 (standard ANLS)
        ("abcde", "abxyz", 0.0),  # NL = 3/5 >= 0.5 -> 0
        ("ab", "ax", 0.0),  # NL = 0.5 exactly -> 0
        ("abcdefghix", ["zzzz", "abcdefghij", "abcdefgxyz"], 0.9),  # max over ground truths (0, 0.9, 0.7)
        ("abcdefgxyz", ["abcdefghij", "abcdefgxyz"], 1.0),
        ("", "", 1.0),  # both empty
        ("   ", [" "], 1.0),
        ("", "abc", 0.0),
        ("abc", "", 0.0),
        ("abc", [], 0.0),  # no ground truth
    ],
)
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


def test_anls_threshold():
    assert anls("abcde", "abxyz", threshold=0.7) == pytest.approx(0.4)  # NL 0.6 < 0.7
    assert anls("abcdefghix", "abcdefghij", threshold=0.1) == 0.0  # NL 0.1 >= 0.1


@pytest.mark.parametrize(
    "text, normalized",
    [("Yes.", "yes"), (" no ", "no"), ("  No.\n", "no"), ("..Yes..", "yes"), ("3.5", "3.5"), ("Yes Sir", "yes sir"),
     ("", "")],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Yes.", "yes", 1.0),
        ("yes", "Yes.", 1.0),
        (" no ", "No", 1.0),
        ("no", "yes", 0.0),
        ("Yes", ["no", "YES"], 1.0),  # any ground truth
        ("maybe", ["no", "yes"], 0.0),
        ("3.5", "3.5", 1.0),
        ("3.5", "35", 0.0),
        ("yes sir", "yessir", 0.0),  # only the ends are stripped
        ("yes, sir", "yes sir", 0.0),
        ("", "", 1.0),
        (".", "", 1.0),
        ("yes", [], 0.0),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_metrics_registry():
    assert METRICS == {"anls": anls, "accuracy": exact_match}


def test_resolve_metric_by_name_or_function():
    assert resolve_metric("anls") == ("anls", anls)

    def starts_right(prediction, answers):
        return float(prediction.startswith(answers[0]))

    assert resolve_metric(starts_right) == ("starts_right", starts_right)
    assert resolve_metric("none") == ("none", None)  # generate, score nothing
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; expected one of \['accuracy', 'anls', 'none'\]"):
        resolve_metric("bleu")
