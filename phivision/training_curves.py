"""`training_curves.png`: a run's losses, task metric, learning rate and gradient norm against the step.

The source is the Trainer's `state.log_history` (also `trainer_state.json`'s "log_history"): one dict
per logging step `{"loss", "grad_norm", "learning_rate", "epoch", "step"}`, one per evaluation during
training `{"eval_loss", "eval_<metric>", ..., "step"}`, and a closing `{"train_runtime", ...}`.

    write_training_curves("out/training_curves.png", trainer.state.log_history, metric="accuracy",
                          before=0.33, after=0.98)

Drawn with matplotlib's object API on an Agg canvas: no display, and pyplot's global state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import write_atomically

WIDTH, HEIGHT, DPI = 12, 8, 100  # inches, dots per inch: a 1200 x 800 px picture


def series(log_history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the entries that log `key` as a finite number, in log order."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def _last_step(log_history: Sequence[dict]) -> int:
    return max((entry.get("step", 0) for entry in log_history), default=0)


def _plot(ax: Axes, steps: list[int], values: list[float], **style) -> None:
    """A line, with a marker on each point while there are few (one point alone draws no line)."""
    ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=4, **style)


def _nothing(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="grey")


def training_curves_figure(log_history: Sequence[dict], metric: str | None = None, before: float | None = None,
                           after: float | None = None, title: str = "Training curves") -> Figure:
    """The figure: loss | task metric (before, during, after training) / learning rate | gradient norm.

    `metric` names the task metric (its values during training are the log's `eval_<metric>`, in 0..1
    like `before` and `after`, the scores of the evaluations before and after training); it is drawn
    in %. A panel with nothing logged says so.
    """
    preference = bool(series(log_history, "rewards/margins")[0])  # a preference (DPO) run: its rewards too
    figure = Figure(figsize=(WIDTH, HEIGHT * (1.5 if preference else 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(3 if preference else 2, 2)
    (loss_ax, metric_ax), (lr_ax, grad_ax) = axes[0], axes[1]
    last = _last_step(log_history)
    epochs = series(log_history, "epoch")[1]
    figure.suptitle(f"{title}: {last} optimizer steps" + (f", {epochs[-1]:.3g} epochs" if epochs else ""),
                    fontsize=14)

    loss_ax.set_title("Loss (answer tokens)")
    for key, label in (("loss", "training"), ("eval_loss", "evaluation")):
        steps, values = series(log_history, key)
        if steps:
            _plot(loss_ax, steps, values, label=label)
    if loss_ax.lines:
        loss_ax.legend()
    else:
        _nothing(loss_ax, "no loss logged")
    loss_ax.set_ylabel("preference loss" if preference else "cross-entropy (nats per token)")

    metric_ax.set_title(f"Task metric: {metric}" if metric else "Task metric")
    steps, values = series(log_history, f"eval_{metric}") if metric else ([], [])
    if steps:
        _plot(metric_ax, steps, [100 * v for v in values], color="tab:green", label="during training")
    for step, score, label, marker in ((0, before, "before training", "s"), (last, after, "after training", "D")):
        if score is not None:
            metric_ax.plot([step], [100 * score], marker, markersize=9, label=f"{label}: {100 * score:.1f}%")
    if metric_ax.lines:
        metric_ax.set_ylim(-3, 103)
        metric_ax.legend(loc="best")
    else:
        _nothing(metric_ax, "not evaluated")
    metric_ax.set_ylabel(f"{metric or 'score'} (%)")

    for ax, key, panel, unit in ((lr_ax, "learning_rate", "Learning rate", "learning rate"),
                                 (grad_ax, "grad_norm", "Gradient norm", "global L2 norm, before clipping")):
        ax.set_title(panel)
        steps, values = series(log_history, key)
        if steps:
            _plot(ax, steps, values, color="tab:purple" if key == "learning_rate" else "tab:red")
        else:
            _nothing(ax, f"no {panel.lower()} logged")
        ax.set_ylabel(unit)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    if preference:
        _rewards(axes[2][0], axes[2][1], log_history)
    pad = 0.03 * max(last, 1)  # so that the markers at step 0 and at the last step show whole
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.set_xlim(-pad, max(last, 1) + pad)
        ax.grid(True, alpha=0.3)
    return figure


def _rewards(rewards_ax: Axes, accuracy_ax: Axes, log_history: Sequence[dict]) -> None:
    """A preference run's implicit rewards (TRL's rewards/chosen, rejected, margins) and reward accuracy."""
    rewards_ax.set_title("Rewards: beta x log-prob ratio to the reference")
    for key, colour in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"),
                        ("rewards/margins", "tab:blue")):
        _plot(rewards_ax, *series(log_history, key), color=colour, label=key.split("/")[1])
    rewards_ax.axhline(0, color="grey", linewidth=0.8)
    rewards_ax.legend()
    rewards_ax.set_ylabel("reward (nats x beta)")
    accuracy_ax.set_title("Reward accuracy: chosen rewarded above rejected")
    steps, values = series(log_history, "rewards/accuracies")
    _plot(accuracy_ax, steps, [100 * v for v in values], color="tab:green")
    accuracy_ax.set_ylim(-3, 103)
    accuracy_ax.set_ylabel("pairs (%)")


def write_training_curves(path: str | Path, log_history: Sequence[dict], metric: str | None = None,
                          before: float | None = None, after: float | None = None,
                          title: str = "Training curves") -> Path:
    """Draws `training_curves_figure(...)` into the PNG `path` (written atomically); returns `path`."""
    figure = training_curves_figure(log_history, metric, before, after, title)
    write_atomically(path, lambda f: figure.savefig(f, format="png"), binary=True)
    return Path(path)
