"""phivision.training.progress: the training bar is named and shows the last logged loss."""

from transformers import TrainerControl, TrainerState

from phivision.training.progress import LossProgressCallback


def test_training_bar_shows_the_last_logged_loss(capsys):
    callback, state, control = LossProgressCallback(), TrainerState(max_steps=4), TrainerControl()
    callback.on_train_begin(None, state, control)
    bar = callback.training_bar
    assert bar.desc.startswith("training")
    callback.on_log(None, state, control, logs={"loss": 0.123456, "grad_norm": 1.5, "learning_rate": 1e-3})
    assert bar.postfix == "loss=0.1235"
    callback.on_log(None, state, control, logs={"train_runtime": 2.0, "train_loss": 0.5})  # no loss: the last stays
    assert bar.postfix == "loss=0.1235"
    callback.on_train_end(None, state, control)
    assert "{'loss': '0.1235'" in capsys.readouterr().out  # transformers still prints each log above the bar


def test_other_ranks_have_no_bar():
    callback, state, control = LossProgressCallback(), TrainerState(max_steps=4, is_world_process_zero=False), TrainerControl()
    callback.on_train_begin(None, state, control)
    callback.on_log(None, state, control, logs={"loss": 0.5})
    assert callback.training_bar is None
