"""What a run shows, end to end on CPU: TensorBoard events, the two pictures, the closing lines, a clean console."""

import json
import shlex

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_eval_report import Page, decode
from test_recipes import check_eval_file, torchrun_recipe

# Library notices that every rank used to print (see phivision.console).
NOISE = ["Failed to load CPU gemm_4bit_forward", "torch_dtype", "Setting accelerator to CPU", "FutureWarning",
         "is deprecated", "built successfully"]


def test_full_finetuning_torchrun_reports_to_tensorboard_draws_the_run_and_prints_only_the_run(tiny, shapes, tmp_path):
    out = tmp_path / "out"
    result = torchrun_recipe(
        "finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
        str(shapes), "--output_dir", str(out), "--batch_size", "4", "--batch_size_per_gpu", "2", "--max_steps", "3",
        "--max_eval_samples", "6", "--report_to", "tensorboard",
    )
    console = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in console, noise
    assert console.count("No GPU: fp16 mixed precision is unavailable") == 1  # our own warning, said once

    # The run ends by naming the command to try (with an image that exists) and both pictures.
    last = result.stdout.strip().splitlines()[-5:]
    assert last[0] == "Try it with:"
    command = shlex.split(last[1])
    with Image.open(command[command.index("--image") + 1]) as image:
        assert image.format == "JPEG"
    assert shlex.split(last[2], comments=True) == ["python", "-m", "phivision.web", "--model", str(out)]
    # The run saved its evaluated examples' images for the web page (a text-only row has none), losslessly.
    index = json.loads((out / "eval_examples" / "index.json").read_text())
    assert sorted(index, key=int) == [str(row) for row in range(6)]
    assert sum(1 for names in index.values() if names) >= 4
    for row, names in index.items():
        assert names in ([], [f"{row}.0.png"]), row
        for name in names:
            with Image.open(out / "eval_examples" / name) as image:
                assert image.format == "PNG"
    assert last[3:] == [f"Training curves: {out / 'training_curves.png'}", f"Evaluation report: {out / 'eval_report.html'}"]

    # --report_to tensorboard: event files under output_dir/runs, as `tensorboard --logdir OUTPUT_DIR/runs` reads them.
    (events,) = (out / "runs").glob("*/events.out.tfevents.*")
    scalars = EventAccumulator(str(events.parent)).Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(scalars.Tags()["scalars"])
    assert [event.step for event in scalars.Scalars("train/loss")] == [1, 2, 3]

    with Image.open(out / "training_curves.png") as picture:
        assert picture.format == "PNG" and picture.width >= 800
    after = check_eval_file(out / "eval_after.json", "accuracy", 6)
    page = Page((out / "eval_report.html").read_text(encoding="utf-8"))
    assert sorted(row["id"] for row in page.rows) == [f"example-{i}" for i in range(6)]
    shown = {row["id"]: row for row in page.rows}
    for i, example in enumerate(after["examples"]):
        assert example["question"] in "".join(shown[f"example-{i}"]["text"])
    thumbnails = [decode(uri) for row in page.rows for uri in row["images"]]
    assert len(thumbnails) >= 4  # one image in each row but every fourth (text-only)
