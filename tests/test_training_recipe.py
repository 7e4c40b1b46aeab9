"""phivision.training.recipe: the steps of a run (the end-to-end runs are in test_recipes.py and test_recipe_custom.py)."""

from phivision.training.recipe import evaluate


def test_evaluation_without_rows_is_skipped(capsys):
    """A dataset without test rows and nothing held out trains without evaluating (no empty eval file, no 0.00)."""
    assert evaluate(None, None, [], None, "accuracy", None, "before") is None
    assert capsys.readouterr().out == "Evaluation before training skipped: no evaluation rows\n"
