"""The training progress bar: transformers' bar, named "training" and showing the last logged loss."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback


class LossProgressCallback(ProgressCallback):
    """`ProgressCallback` whose bar reads `training: 40%|...| 38/96 [00:09<00:14, loss=0.5]`.

    The logged dicts are still printed above the bar, as transformers does.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        loss = (logs or {}).get("loss")
        if self.training_bar is not None and isinstance(loss, (int, float)):
            self.training_bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
