"""Phi-4-multimodal through the recipes, end to end on CPU (issue 23's "Done when"), on the tiny checkpoint.

Each recipe runs once, in one process (--deepspeed none, a few steps), in one of the training modes; the tests
then read what the runs left: the smoke run's files, the mode's effect on the eval loss and the logits against
the base as it runs on images (base + its shipped vision LoRA merged), the saved full model reloaded in
transformers, and a LoRA output merged and generated with.
"""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import built_once
from safetensors import safe_open
from test_recipes import check_eval_file, docvqa_dataset, log_losses, run_recipe

from phivision.collator import DataCollator
from phivision.data import cauldron_example
from phivision.phi4mm.family import Phi4MMFamily, has_vision_lora
from phivision.phi4mm.modes import SPEECH_PREFIX, VISION_LORA_FOLDER
from phivision.synthetic import make_shapes_dataset, shape_image, shapes_rows

FAMILY = Phi4MMFamily()
QUESTION = "What colour is the shape? Answer red, green or blue."
FEW_STEPS = ["--max_steps", "3", "--learning_rate", "1e-2", "--max_eval_samples", "4", "--save_steps", "1000",
             "--seed", "0"]


def ucf101_frames(folder: Path) -> Path:
    """Converted UCF-101 data (ucf101_{train,test}.jsonl) whose clips are 8 frames of one coloured shape each."""
    import random

    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    for split, clips in (("train", 8), ("test", 3)):
        records = []
        for k in range(clips):
            colour = rng.choice(["red", "green", "blue"])
            frames = []
            for f in range(8):
                shape_image(colour, rng).save(folder / "images" / f"{split}-{k}-{f}.png")
                frames.append(f"{split}-{k}-{f}.png")
            records.append({"id": f"{split}-{k}", "conversations": [{"images": frames, "user": QUESTION,
                                                                     "assistant": colour}]})
        (folder / f"ucf101_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def custom_jsonl(folder: Path) -> Path:
    """A converted-format jsonl file for the custom recipe: one shape per record, every fourth record text-only."""
    rows = shapes_rows(12, seed=4, text_only_every=4)
    (folder / "images").mkdir(parents=True)
    records = []
    for k, row in enumerate(rows):
        turn = {"user": row["texts"][0]["user"], "assistant": row["texts"][0]["assistant"]}
        if row["images"]:
            row["images"][0].save(folder / "images" / f"{k}.png")
            turn["images"] = [f"{k}.png"]
        records.append({"id": str(k), "conversations": [turn]})
    (folder / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "mine.jsonl"


# recipe -> (script, its mode and step flags, its data flags given a scratch folder and the shapes dataset)
RECIPES: dict[str, tuple[str, list[str], Callable[[Path, Path], list[str]]]] = {
    "hateful_memes": ("finetune_hf_trainer_hateful_memes.py", [],
                      lambda tmp, shapes: ["--dataset_name_or_path", str(shapes)]),
    "docvqa": ("finetune_hf_trainer_docvqa.py", ["--freeze_vision_model"],
               lambda tmp, shapes: ["--dataset_name_or_path", str(docvqa_dataset(tmp / "docvqa"))]),
    "nlvr2": ("finetune_hf_trainer_nlvr2.py", ["--use_lora", "--lora_rank", "4"],
              lambda tmp, shapes: ["--dataset_name_or_path",
                                   str(make_shapes_dataset(tmp / "pairs", num_train=16, images_per_row=2))]),
    # 8 frames are 16 crops of 448 pixels and 4,360 image tokens a sample: 2 steps of 1 clip, 1 evaluated briefly.
    "ucf101": ("finetune_hf_trainer_ucf101.py", ["--max_steps", "2", "--batch_size", "1", "--batch_size_per_gpu", "1",
                                                 "--max_eval_samples", "1", "--max_new_tokens", "4"],
               lambda tmp, shapes: ["--data_dir", str(ucf101_frames(tmp / "ucf101"))]),
    # QLoRA computing in fp32 (no --bf16): CPUs without bf16 units run bf16 several times slower.
    "custom": ("finetune_hf_trainer_custom.py", ["--use_qlora", "--lora_rank", "4", "--packing"],
               lambda tmp, shapes: ["--data_file", str(custom_jsonl(tmp / "custom")), "--eval_fraction", "0.34"]),
}
EVALUATED = {"ucf101": 1}  # the others: 4 (--max_eval_samples)
MODES = {"full": "hateful_memes", "frozen vision": "docvqa", "LoRA": "nlvr2", "QLoRA packed": "custom"}


def probe(processor) -> dict:
    """A fixed evaluation batch of the colour task (two images, a text-only row), labelled on the answers."""
    return DataCollator(processor, cauldron_example, num_crops=1)(shapes_rows(6, seed=123, text_only_every=3))


@torch.no_grad()
def loss_and_logits(model: torch.nn.Module, batch: dict) -> tuple[float, torch.Tensor]:
    """The family's training loss (what the Trainer's compute_loss computes) and the logits, in eval mode."""
    model.eval()
    loss = FAMILY.training_loss(model, batch)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    return loss.item(), logits


def run_once(tmp_path_factory, name: str, tiny: Path, shapes: Path) -> Path:
    """The recipe `name`'s run (built once per test run): its output in out/, and in trained.pt the loss and logits
    of the model the run trained, on `probe`, taken in the run right after the model was saved."""
    script, mode, data = RECIPES[name]

    def build(folder: Path) -> None:
        from phivision.training import recipe

        save = recipe.save

        def save_and_probe(trainer, processor, args, **kwargs):
            save(trainer, processor, args, **kwargs)
            model = trainer.accelerator.unwrap_model(trainer.model)
            with recipe.half_precision(args, model):
                loss, logits = loss_and_logits(model, probe(processor))
            torch.save({"loss": loss, "logits": logits}, folder / "trained.pt")

        folder.mkdir()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(recipe, "save", save_and_probe)
            run_recipe(script, "--model_name_or_path", str(tiny), *data(folder, shapes), "--output_dir",
                       str(folder / "out"), "--deepspeed", "none", "--batch_size", "4", "--batch_size_per_gpu", "4",
                       *FEW_STEPS, *mode)

    return built_once(tmp_path_factory, f"phi4mm-{name}", build)


@pytest.fixture(scope="module")
def runs(tiny_phi4mm, shapes, tmp_path_factory):
    """recipe name -> its run's folder (run when first asked for)."""
    return lambda name: run_once(tmp_path_factory, name, tiny_phi4mm, shapes)


def base_model(tiny: Path, quantized: bool = False) -> torch.nn.Module:
    """The base as it runs on images: the checkpoint with its shipped vision LoRA merged (fp32, or QLoRA's 4-bit)."""
    kwargs = {"dtype": torch.float32}
    if quantized:
        from phivision.training.modes import quantization_config

        kwargs = {"dtype": torch.float32, "quantization_config": quantization_config(torch.float32)}
    return FAMILY.as_it_runs_on_images(FAMILY.model_class().from_pretrained(tiny, **kwargs), str(tiny))


def trained_model(tiny: Path, out: Path, quantized: bool = False) -> torch.nn.Module:
    """A run's output as a user loads it: a full model by itself, an adapter on the base as it runs on images."""
    if (out / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model(tiny, quantized), out)
    return FAMILY.as_it_runs_on_images(FAMILY.model_class().from_pretrained(out, dtype=torch.float32), str(out))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_runs_on_phi4mm(name, runs, tiny_phi4mm):
    """Evaluation before, training, save, evaluation after and the report files, as for Phi-3-V."""
    out = runs(name) / "out"
    metric = "anls" if name == "docvqa" else "accuracy"
    for when in ("before", "after"):
        summary = check_eval_file(out / f"eval_{when}.json", metric, EVALUATED.get(name, 4))
        assert all(example["prediction"] is not None for example in summary["examples"])
    steps = 2 if name == "ucf101" else 3
    losses = log_losses(out / f"checkpoint-{steps}")
    assert len(losses) == steps and all(loss == loss and 0 < loss < 20 for loss in losses)
    assert (out / "eval_report.html").is_file() and (out / "training_curves.png").is_file()
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    if "--use_lora" in RECIPES[name][1] or "--use_qlora" in RECIPES[name][1]:
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(tiny_phi4mm)
        assert not (out / "model.safetensors").exists()
    else:
        assert config["model_type"] == "phi4_multimodal" and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_training_moves_the_eval_loss_and_logits_away_from_the_base(mode, runs, tiny_phi4mm):
    """What training changed is what the saved output does (the trap of ms-swift #5811: a loss that trained, and
    outputs equal to the base's), measured against the base as it runs on images."""
    name = MODES[mode]
    folder = runs(name)
    quantized = mode.startswith("QLoRA")
    batch = probe(FAMILY.load_processor(str(tiny_phi4mm)))
    base_loss, base_logits = loss_and_logits(base_model(tiny_phi4mm, quantized), batch)
    loss, logits = loss_and_logits(trained_model(tiny_phi4mm, folder / "out", quantized), batch)
    # Three steps on the colour task take the answer loss down from the random model's, about ln(vocab) = 6.40
    # (measured: LoRA 6.14, QLoRA 6.07).
    assert loss < base_loss - 0.1, (loss, base_loss)
    assert (logits - base_logits).abs().max() > 0.1
    # The saved output does what the trained model did: its loss is the one the run measured after training.
    trained = torch.load(folder / "trained.pt")
    assert loss == pytest.approx(trained["loss"], abs=0.05 if quantized else 1e-4)


def test_frozen_vision_keeps_the_image_embedding_of_the_base_as_it_runs(runs, tiny_phi4mm):
    out = runs("docvqa") / "out"
    base = base_model(tiny_phi4mm).state_dict()
    saved = FAMILY.model_class().from_pretrained(out, dtype=torch.float32).state_dict()
    vision = [name for name in base if name.startswith("model.embed_tokens_extend.image_embed.")]
    assert vision and all(torch.equal(base[name], saved[name]) for name in vision)
    assert not torch.equal(base["model.layers.0.self_attn.qkv_proj.weight"],
                           saved["model.layers.0.self_attn.qkv_proj.weight"])


def test_saved_full_model_reloads_in_transformers_with_the_trained_logits_and_the_base_speech_encoder(
        runs, tiny_phi4mm):
    from transformers import AutoModelForCausalLM, Phi4MultimodalForCausalLM

    folder = runs("hateful_memes")
    out = folder / "out"
    assert not (out / VISION_LORA_FOLDER).exists() and not has_vision_lora(str(out))  # the vision LoRA is merged in
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model) is Phi4MultimodalForCausalLM
    _, logits = loss_and_logits(model, probe(FAMILY.load_processor(str(out))))
    torch.testing.assert_close(logits, torch.load(folder / "trained.pt")["logits"], rtol=0, atol=1e-5)

    with safe_open(tiny_phi4mm / "model.safetensors", "pt") as base, safe_open(out / "model.safetensors", "pt") as saved:
        speech = [key for key in base.keys() if key.startswith(SPEECH_PREFIX)]
        assert speech and set(speech) <= set(saved.keys())
        for key in speech:
            a, b = base.get_tensor(key), saved.get_tensor(key)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


def test_lora_output_merges_to_base_plus_vision_lora_plus_adapter_and_generates_as_the_adapter_does(
        runs, tiny_phi4mm, tmp_path, capsys):
    import random

    from transformers import AutoModelForCausalLM

    from phivision import generate, merge_lora

    out, merged = runs("nlvr2") / "out", tmp_path / "merged"
    assert merge_lora.main(["--adapter", str(out), "--out", str(merged), "--dtype", "fp32"]) == 0  # base from the adapter
    assert not (merged / VISION_LORA_FOLDER).exists()
    batch = probe(FAMILY.load_processor(str(tiny_phi4mm)))
    _, reference = loss_and_logits(trained_model(tiny_phi4mm, out), batch)  # base + vision LoRA + adapter, unmerged
    _, merged_logits = loss_and_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), batch)
    _, base_logits = loss_and_logits(base_model(tiny_phi4mm), batch)
    assert (reference - base_logits).abs().max() > 0.1  # the adapter matters...
    torch.testing.assert_close(merged_logits, reference, rtol=0, atol=1e-4)  # ...and is merged (fp32 sums reordered)

    image = tmp_path / "shape.png"
    shape_image("green", random.Random(1)).save(image)
    ask = ["--image", str(image), "--prompt", QUESTION, "--max_new_tokens", "6", "--num_crops", "1"]
    capsys.readouterr()
    assert generate.main(["--model", str(merged), *ask]) == 0
    from_merged = capsys.readouterr().out.strip()
    assert generate.main(["--model", str(tiny_phi4mm), "--adapter", str(out), *ask]) == 0
    assert from_merged and capsys.readouterr().out.strip() == from_merged
