"""The model under torch.compile: whole graphs for the decoder and vision layers, and a bounded number of
recompiles however the batches vary (dynamo's own counters on the tiny model, eager backend: the graphs
dynamo captures do not depend on the backend)."""

import pytest
import torch

from phivision import Phi3VForCausalLM, Phi3VProcessor
from phivision.collator import pad_batch
from phivision.tiny import tiny_config
from test_modeling import image_inputs, prompt_ids

dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture
def frozen_vision_model():
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config()).train()
    model.model.vision_embed_tokens.img_processor.freeze_unused()
    model.model.vision_embed_tokens.requires_grad_(False)
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def encoded(crops_hw, text_length: int) -> dict:
    """A sample as the collator encodes it: text, the images' tokens, text; labels on the text."""
    ids = prompt_ids(crops_hw, text=tuple(range(5, 5 + text_length)))
    pixel_values, image_sizes = image_inputs(crops_hw) if crops_hw else (None, None)
    return {"input_ids": ids, "labels": [-100 if i < 0 else i for i in ids], "pixel_values": pixel_values,
            "image_sizes": image_sizes}


def source_files(graph) -> set[str]:
    """The source files whose code a captured graph holds."""
    files = set()
    for node in graph.graph.nodes:
        for line in (node.meta.get("stack_trace") or "").splitlines():
            if line.strip().startswith("File "):
                files.add(line.split('"')[1].rsplit("/", 1)[-1])
    return files


@pytest.mark.parametrize("training", [True, False], ids=["training step", "generation prefill"])
def test_decoder_and_vision_layers_compile_without_graph_breaks(frozen_vision_model, training):
    model = frozen_vision_model.train(training)
    batch = pad_batch([encoded([(2, 1)], 3), encoded([(1, 1)], 9)], pad_token_id=0, batch_images=Phi3VProcessor.batch_images)
    if not training:
        del batch["labels"]
    with torch.set_grad_enabled(training):
        explanation = dynamo.explain(model)(**batch, use_cache=not training)
    # The breaks: the host-side image layout (crop grids from image_sizes), and in training the answer
    # positions of the loss (a data-dependent shape); every other graph boundary is a frame around them.
    places = {"layout" if "self.layout(" in frame.line else frame.name
              for reason in explanation.break_reasons for frame in reason.user_stack[-1:]}
    assert places == ({"layout", "answer_loss"} if training else {"layout"}), explanation.break_reasons
    decoder = [g for g in explanation.graphs if "modeling_phi3.py" in source_files(g)]
    vision = [g for g in explanation.graphs if "modeling_clip.py" in source_files(g)]
    assert len(decoder) == 1 and len(vision) == 1  # each stack of layers is one whole graph
    assert explanation.graph_break_count <= (5 if training else 4)


def test_length_grouped_batches_recompile_a_bounded_number_of_times(frozen_vision_model):
    """New lengths, image counts and crop grids reuse the graphs of the first few batches (dynamic shapes):
    image layouts are index tensors, not constants of the graph."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(frozen_vision_model, backend=counter)

    def train_on(*samples):
        compiled(**pad_batch(list(samples), pad_token_id=0, batch_images=Phi3VProcessor.batch_images)).loss.backward()

    # Warm-up: static shapes, then dynamic ones (lengths, image and crop counts); one image (dynamo
    # specialises sizes of 1); text only. Batches of 2, as the Trainer makes them (--batch_size_per_gpu).
    train_on(encoded([(1, 1)], 3), encoded([(1, 1)], 5))
    train_on(encoded([(1, 1), (1, 1)], 6), encoded([(1, 1)], 9))
    train_on(encoded([(1, 1)], 4), encoded([], 2))
    train_on(encoded([], 7), encoded([], 3))
    warm = counter.frame_count
    train_on(encoded([(2, 1)], 12), encoded([(1, 2), (1, 1), (1, 1)], 2))
    train_on(encoded([(1, 3)], 10), encoded([], 8))
    assert counter.frame_count == warm, f"{counter.frame_count - warm} recompiles after the warm-up"
    assert warm <= 24  # up to 6 graphs a step: static shapes, dynamic shapes, one image, text only


@pytest.mark.parametrize("packing", [False, True])
def test_torch_compile_trains_and_evaluates_a_recipe(tiny, shapes, tmp_path, capsys, packing):
    """--torch_compile end to end, the recipe's whole flow (evaluation before, training, evaluation during and
    after), padded or packed: the Trainer's steps run the compiled model. The backend is aot_eager (dynamo and
    AOTAutograd, as inductor gets them, without inductor's minutes of C++ builds on CPU)."""
    from test_recipes import run_recipe

    run_recipe("finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
               str(shapes), "--output_dir", str(tmp_path / "out"), "--deepspeed", "none", "--batch_size", "2",
               "--batch_size_per_gpu", "2", "--max_steps", "2", "--max_eval_samples", "2",
               "--max_new_tokens", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no",
               "--torch_compile", "--torch_compile_backend", "aot_eager", *(["--packing"] if packing else []))
    assert dynamo.utils.counters["stats"]["unique_graphs"] > 0
    logs = capsys.readouterr().out
    assert "'loss':" in logs and "'eval_loss':" in logs and "nan" not in logs
    assert (tmp_path / "out" / "eval_before.json").is_file() and (tmp_path / "out" / "eval_after.json").is_file()
