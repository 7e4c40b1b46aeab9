"""Fine-tuning: what a recipe script calls.

- `arguments`: the flags (`parse_args`; every `TrainingArguments` flag plus model, LoRA and data options);
- `modes`: the model set up for full fine-tuning, frozen vision, LoRA or QLoRA;
- `trainer`: the rows the Trainer iterates over and their order (length groups, LongRoPE sides);
- `progress`: the training bar, showing the last loss;
- `recipe`: the run's steps (`run`: evaluate, train, save, evaluate, draw the run, try it);
- `report`: what a run leaves to look at (training_curves.png, eval_report.html, an example image).
"""

from .arguments import FlagError, RecipeTrainingArguments, RecipeArguments, parse_args
from .recipe import run

__all__ = ["FlagError", "RecipeTrainingArguments", "RecipeArguments", "parse_args", "run"]
