"""phivision.training_curves: what each panel draws from a Trainer log history, and the PNG it writes."""

import math

import pytest
from PIL import Image

from phivision.training_curves import series, training_curves_figure, write_training_curves

# What trainer.state.log_history holds after 10 steps, logging every 2, evaluating at 5 and 10.
HISTORY = [
    *({"loss": 3.0 - 0.25 * s, "grad_norm": 1.0 + s, "learning_rate": 1e-3 * (1 - s / 10), "epoch": s / 5, "step": s}
      for s in range(2, 11, 2)),
    {"eval_loss": 2.2, "eval_accuracy": 0.5, "eval_runtime": 1.0, "epoch": 1.0, "step": 5},
    {"eval_loss": 1.6, "eval_accuracy": 0.75, "eval_runtime": 1.0, "epoch": 2.0, "step": 10},
    {"train_runtime": 12.0, "train_loss": 2.0, "total_flos": 1e9, "epoch": 2.0, "step": 10},
]


def lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_series_keeps_finite_numbers_with_a_step():
    history = [{"grad_norm": 1.0, "step": 1}, {"grad_norm": math.inf, "step": 2}, {"grad_norm": math.nan, "step": 3},
               {"grad_norm": 2.0}, {"grad_norm": "n/a", "step": 5}, {"grad_norm": 3, "step": 6}]
    assert series(history, "grad_norm") == ([1, 6], [1.0, 3.0])


def test_panels_draw_losses_metric_learning_rate_and_gradient_norm():
    figure = training_curves_figure(HISTORY, "accuracy", before=1 / 3, after=0.8, title="Training of out")
    loss, metric, lr, grad = figure.axes
    assert lines(loss)["training"] == ([2, 4, 6, 8, 10], [2.5, 2.0, 1.5, 1.0, 0.5])
    assert lines(loss)["evaluation"] == ([5, 10], [2.2, 1.6])
    drawn = lines(metric)
    assert drawn["during training"] == ([5, 10], [50.0, 75.0])  # in %
    assert drawn["before training: 33.3%"] == ([0], [pytest.approx(100 / 3)])
    assert drawn["after training: 80.0%"] == ([10], [80.0])  # at the last step
    assert lr.lines[0].get_ydata()[0] == 1e-3 * 0.8 and list(grad.lines[0].get_xdata()) == [2, 4, 6, 8, 10]
    for ax in figure.axes:
        assert ax.get_title() and ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
    assert metric.get_ylabel() == "accuracy (%)"
    assert figure.get_suptitle() == "Training of out: 10 optimizer steps, 2 epochs"


def test_a_run_without_evaluations_or_logs_says_so_in_its_panels():
    figure = training_curves_figure([{"train_runtime": 1.0, "epoch": 0.1, "step": 1}])
    assert [[text.get_text() for text in ax.texts] for ax in figure.axes] == [
        ["no loss logged"], ["not evaluated"], ["no learning rate logged"], ["no gradient norm logged"]]


def test_written_png_is_a_readable_1200_by_800_picture(tmp_path):
    path = write_training_curves(tmp_path / "training_curves.png", HISTORY, "anls", after=0.5)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
    assert [p.name for p in tmp_path.iterdir()] == ["training_curves.png"]  # no temporary file left


def test_a_preference_run_gets_its_rewards_and_reward_accuracy_drawn():
    """A DPO run's log (TRL's rewards/* keys) adds a row: the rewards of chosen, rejected and their margin, and the
    share of pairs whose chosen answer is rewarded above the rejected one (in %)."""
    history = [{"loss": 0.69, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
                "rewards/accuracies": 0.5, "step": 1},
               {"loss": 0.3, "rewards/chosen": 0.5, "rewards/rejected": -0.75, "rewards/margins": 1.25,
                "rewards/accuracies": 0.875, "step": 2}]
    figure = training_curves_figure(history)
    assert len(figure.axes) == 6
    rewards, accuracy = figure.axes[4], figure.axes[5]
    drawn = lines(rewards)
    assert drawn["chosen"] == ([1, 2], [0.0, 0.5]) and drawn["rejected"] == ([1, 2], [0.0, -0.75])
    assert drawn["margins"] == ([1, 2], [0.0, 1.25])
    assert list(accuracy.lines[0].get_ydata()) == [50.0, 87.5]
    assert figure.axes[0].get_ylabel() == "preference loss"
    assert len(training_curves_figure(HISTORY).axes) == 4  # a supervised run: as before
