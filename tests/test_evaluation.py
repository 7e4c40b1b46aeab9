"""phivision.evaluation: `evaluate` with a fake model (exact metric), the tiny model, LongRoPE, peft and torchrun."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from forked import forked_run
from PIL import Image

from phivision.chat import conversation_prompt
from phivision.evaluation import evaluate



def _image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_rows():
    """Six synthetic rows with 0, 1 and 2 images, one multi-turn, one with several ground truths."""
    return [
        {"id": "r0", "question": "Is the sky blue?", "answer": "Yes", "images": []},
        {"id": "r1", "question": "What colour is the square?", "answer": "red", "images": [(400, 300, 1)]},
        {"id": "r2", "question": "Are the two pictures the same?", "answer": "no",
         "images": [(300, 500, 2), (500, 300, 3)]},
        {"question": "Count the dots.", "answer": "3", "answers": ["3", "three"], "images": [(200, 200, 4)]},
        {"id": "r4", "question": "Say hello.", "answer": "hello", "images": [],
         "history": [("Hi there, this is a much longer first question?", "Hello.")]},
        {"id": "r5", "question": "Which one is larger?", "answer": "the left one",
         "images": [(640, 480, 5), (336, 336, 6)]},
    ]


def format_example(row):
    conversation = [{"user": user, "assistant": answer} for user, answer in row.get("history", [])]
    last = {"user": row["question"], "assistant": row["answer"]}
    if "answers" in row:
        last["answers"] = row["answers"]
    conversation.append(last)
    return conversation, [_image(*spec) for spec in row["images"]]


@pytest.fixture(scope="module")
def processor():
    tiny = pytest.importorskip("phivision.tiny")
    return tiny.build_tiny_processor(num_crops=4)


def tiny_model(processor, seed=0):
    from phivision import Phi3VForCausalLM
    from phivision.tiny import tiny_config

    torch.manual_seed(seed)
    return Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer))).eval()


class FakeModel(torch.nn.Module):
    """Answers each prompt with a canned text chosen from the prompt, then `<|end|>` and padding."""

    def __init__(self, tokenizer, canned):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.canned = tokenizer, canned
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        assert not self.training and not torch.is_grad_enabled()
        assert kwargs["do_sample"] is False
        self.calls.append(input_ids.shape[0])
        end = self.tokenizer.convert_tokens_to_ids("<|end|>")
        assert end in eos_token_id
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left padded"
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m and t >= 0])
            answer = next(text for key, text in self.canned.items() if key in prompt)
            rows.append(self.tokenizer.encode(answer, add_special_tokens=False) + [end])
        width = max(map(len, rows)) + 2
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_with_known_predictions_gives_the_exact_metric(processor, tmp_path):
    rows = make_rows()
    canned = {  # question -> prediction
        "Is the sky blue?": " yes. ",  # accuracy 1 (normalised)
        "What colour is the square?": "Red",  # 1
        "Are the two pictures the same?": "yes",  # 0
        "Count the dots.": "three",  # 1 (second ground truth)
        "Say hello.": "hello",  # 1
        "Which one is larger?": "the right one",  # 0
    }
    model = FakeModel(processor.tokenizer, canned).train()
    output = tmp_path / "sub" / "eval.json"
    summary = evaluate(model, processor, rows, format_example, "accuracy", batch_size=4, output_file=output,
                       disable_tqdm=True)
    assert model.training, "the training mode is restored"
    assert sorted(model.calls) == [2, 4]
    assert summary["metric"] == "accuracy" and summary["num_examples"] == 6
    assert [e["score"] for e in summary["examples"]] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert summary["score"] == pytest.approx(4 / 6)
    assert [e["prediction"] for e in summary["examples"]] == [
        "yes.", "Red", "yes", "three", "hello", "the right one"]
    assert json.loads(output.read_text()) == summary
    assert [p.name for p in output.parent.iterdir()] == ["eval.json"], "no temporary file left behind"

    anls_summary = evaluate(model, processor, rows, format_example, "anls", batch_size=3, disable_tqdm=True)
    # "yes." vs "Yes": 1 edit / 4; "the right one" vs "the left one": 4 edits / 13
    expected = [0.75, 1.0, 0.0, 1.0, 1.0, 1 - 4 / 13]
    assert [e["score"] for e in anls_summary["examples"]] == pytest.approx(expected)
    assert anls_summary["score"] == pytest.approx(sum(expected) / 6)

    unscored = evaluate(model, processor, rows, format_example, "none", batch_size=4, disable_tqdm=True)
    assert unscored["metric"] == "none" and unscored["score"] is None  # answers to read, no score
    assert [e["score"] for e in unscored["examples"]] == [None] * 6
    assert [e["prediction"] for e in unscored["examples"]] == [e["prediction"] for e in summary["examples"]]

    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(model, processor, rows, format_example, "bleu")


def test_evaluation_bar_shows_the_running_score(processor, capsys):
    rows = make_rows()[:3]
    canned = {"Is the sky blue?": "yes", "What colour is the square?": "blue", "Are the two pictures the same?": "no"}
    evaluate(FakeModel(processor.tokenizer, canned), processor, rows, format_example, "accuracy", batch_size=1)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "3/3" in last and "accuracy=66.7" in last


def test_evaluate_tiny_model_records_and_batching(processor, tmp_path):
    rows = make_rows()
    model = tiny_model(processor)
    output = tmp_path / "eval.json"
    batched = evaluate(model, processor, rows, format_example, "accuracy", batch_size=4, max_new_tokens=8,
                       output_file=output, disable_tqdm=True)
    assert not model.training
    written = json.loads(output.read_text())
    assert written == batched
    assert written["metric"] == "accuracy" and written["num_examples"] == len(rows)
    examples = written["examples"]
    assert [e["id"] for e in examples] == ["r0", "r1", "r2", 3, "r4", "r5"]  # row id, else the index
    assert [e["question"] for e in examples] == [r["question"] for r in rows]
    assert [e["answers"] for e in examples] == [r.get("answers", [r["answer"]]) for r in rows]
    assert [e["row"] for e in examples] == list(range(len(rows)))  # the row each example came from
    for e in examples:
        assert set(e) == {"row", "id", "question", "answers", "prediction", "score"}
        assert isinstance(e["prediction"], str) and e["score"] in (0.0, 1.0)
    assert any(e["prediction"] for e in examples), "a random model still generates text"

    single = evaluate(model, processor, rows, format_example, "accuracy", batch_size=1, max_new_tokens=8,
                      disable_tqdm=True)
    assert [e["prediction"] for e in single["examples"]] == [e["prediction"] for e in examples], (
        "left padding changed the greedy outputs"
    )


def test_evaluate_batches_give_single_prompt_answers_across_the_longrope_switch(processor):
    """Prompts on both sides of LongRoPE's switch: batching must not move any of them to the other side."""
    from phivision import Phi3VForCausalLM
    from phivision.generation import generate_answers
    from phivision.phi3v.modeling import longrope_limit
    from phivision.tiny import tiny_config

    rows = make_rows()
    items = [format_example(row) for row in rows]
    prompts = [conversation_prompt(conversation, len(images), processor) for conversation, images in items]
    lengths = [processor.num_prompt_tokens(prompt, [image.size for image in images])
               for prompt, (_, images) in zip(prompts, items)]
    assert lengths == [19, 784, 1548, 776, 65, 1541]
    torch.manual_seed(0)  # switch at 780: 19 and 65 stay short, 776 crosses it while generating, the rest start long
    model = Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer), original_max_position_embeddings=780))
    model.eval()
    with torch.no_grad():  # sharper attention than at init, so that the positions (and rope factors) matter
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(20)
    assert longrope_limit(model) == 780
    alone = [generate_answers(model, processor, [prompt], [images], max_new_tokens=8)[0]
             for prompt, (_, images) in zip(prompts, items)]
    mixed = generate_answers(model, processor, prompts, [images for _, images in items], max_new_tokens=8)
    assert mixed != alone, "one batch over the switch changes answers (what evaluate must avoid)"
    batched = evaluate(model, processor, rows, format_example, "accuracy", batch_size=8, max_new_tokens=8,
                       disable_tqdm=True)
    assert [e["prediction"] for e in batched["examples"]] == alone


def test_evaluate_bf16_model_restores_training_mode(processor):
    rows = make_rows()[:3]
    model = tiny_model(processor).to(torch.bfloat16).train()
    summary = evaluate(model, processor, rows, format_example, "anls", batch_size=2, max_new_tokens=4,
                       disable_tqdm=True)
    assert model.training
    assert summary["num_examples"] == 3 and 0.0 <= summary["score"] <= 1.0


def test_evaluate_peft_model(processor):
    peft = pytest.importorskip("peft")
    rows = make_rows()[:2]
    model = tiny_model(processor)
    plain = evaluate(model, processor, rows, format_example, "accuracy", batch_size=2, max_new_tokens=4,
                     disable_tqdm=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"])
    wrapped = peft.get_peft_model(model, config).train()
    summary = evaluate(wrapped, processor, rows, format_example, "accuracy", batch_size=2, max_new_tokens=4,
                       disable_tqdm=True)
    assert wrapped.training
    # LoRA B starts at zero: the adapter does not change the outputs.
    assert [e["prediction"] for e in summary["examples"]] == [e["prediction"] for e in plain["examples"]]


TORCHRUN_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests_dir!r})
from test_evaluation import format_example, make_rows, tiny_model
from phivision.evaluation import evaluate
from phivision.tiny import build_tiny_processor

dist.init_process_group("gloo")
processor = build_tiny_processor(num_crops=4)
model = tiny_model(processor)
model.load_state_dict(torch.load({weights!r}))
summary = evaluate(model, processor, make_rows(), format_example, "accuracy", batch_size=2, max_new_tokens=8,
                   output_file={output!r})
with open({output!r} + f".rank{{dist.get_rank()}}", "w") as f:
    json.dump(summary, f)
dist.destroy_process_group()
"""


def test_evaluate_on_two_ranks_matches_the_single_process_run(processor, tmp_path):
    rows = make_rows()
    model = tiny_model(processor)
    expected = evaluate(model, processor, rows, format_example, "accuracy", batch_size=3, max_new_tokens=8,
                        disable_tqdm=True)
    weights, output = tmp_path / "weights.pt", tmp_path / "eval.json"
    torch.save(model.state_dict(), weights)
    script = tmp_path / "run_eval.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT).format(
        tests_dir=str(Path(__file__).parent), weights=str(weights), output=str(output)))
    # Two ranks with torchrun's environment, forked from a process that has imported the libraries (tests/forked.py).
    result = forked_run(script, [], nproc=2, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    written = json.loads(output.read_text())
    assert written == expected
    for rank in (0, 1):  # every rank returns the whole summary
        assert json.loads(Path(f"{output}.rank{rank}").read_text()) == expected
