"""phivision.generate: streamed answers (one and two images, adapters), jsonl batches, sampling flags, try_command."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TextStreamer

from phivision.generate import build_parser, main
from phivision.generation import try_command
from phivision.phi3v.modeling import Phi3VForCausalLM
from phivision.phi3v.processing import Phi3VProcessor

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<|user|>\n{tags}{text}<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "red.png", folder / "sub" / "green.jpg"]
    paths[1].parent.mkdir()
    Image.new("RGB", (500, 300), "red").save(paths[0])
    Image.new("RGB", (200, 400), (20, 200, 90)).save(paths[1])
    return paths


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A LoRA adapter (non-zero, so it changes answers) saved with a processor of num_crops 2, as training saves."""
    from peft import LoraConfig, get_peft_model

    from phivision.training.modes import lora_target_modules

    model = Phi3VForCausalLM.from_pretrained(tiny)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                  target_modules=lora_target_modules(model, include_vision=True)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    Phi3VProcessor.from_pretrained(tiny, num_crops=2).save_pretrained(out)
    return out


def reference_answer(model, processor, prompt: str, images: list, num_crops: int = 1, max_new_tokens: int = 8,
                     **kwargs) -> str:
    """Greedy answer straight from model.generate, for comparison."""
    inputs = processor(prompt, [Image.open(p) for p in images], num_crops=num_crops)
    stop = processor.tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    with torch.no_grad():
        output = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                       **kwargs)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    new = new[: next((k for k, t in enumerate(new) if t in stop), len(new))]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_image_is_streamed(tiny, images, capsys, monkeypatch):
    puts = []
    original_put = TextStreamer.put
    monkeypatch.setattr(TextStreamer, "put", lambda self, value: (puts.append(value.shape), original_put(self, value)))
    code, out, _ = run(capsys, "--model", tiny, "--image", images[0], "--prompt", "What colour is it?",
                       "--max_new_tokens", 8)
    assert code == 0
    model, processor = Phi3VForCausalLM.from_pretrained(tiny), Phi3VProcessor.from_pretrained(tiny)
    expected = reference_answer(model, processor, PROMPT.format(tags="<|image_1|>\n", text="What colour is it?"),
                                images[:1])
    assert expected and out.strip() == expected  # stdout is the answer only
    assert len(puts) >= 3  # the prompt (skipped), then token by token


def test_two_images_get_their_tags_first_unless_placed(tiny, images, capsys):
    two = ["--model", tiny, "--image", images[0], "--image", images[1], "--max_new_tokens", 8]
    untagged = run(capsys, *two, "--prompt", "Compare.")
    tagged = run(capsys, *two, "--prompt", "<|image_1|>\n<|image_2|>\nCompare.")
    assert untagged[0] == tagged[0] == 0 and untagged[1] == tagged[1]
    model, processor = Phi3VForCausalLM.from_pretrained(tiny), Phi3VProcessor.from_pretrained(tiny)
    expected = reference_answer(model, processor, PROMPT.format(tags="<|image_1|>\n<|image_2|>\n", text="Compare."),
                                images)
    assert untagged[1].strip() == expected
    code, _, err = run(capsys, *two, "--prompt", "<|image_2|> then <|image_1|>")
    assert code == 1 and "error: prompt: its tags are <|image_2|>, <|image_1|>" in err


def test_adapter_is_applied_with_its_processor(tiny, adapter, images, capsys):
    from peft import PeftModel

    code, out, _ = run(capsys, "--model", tiny, "--adapter", adapter, "--image", images[0], "--prompt", "Colour?",
                       "--max_new_tokens", 8)
    assert code == 0
    model = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny), adapter)
    processor = Phi3VProcessor.from_pretrained(tiny)
    prompt = PROMPT.format(tags="<|image_1|>\n", text="Colour?")
    expected = reference_answer(model, processor, prompt, images[:1], num_crops=2)  # the adapter folder's num_crops
    assert out.strip() == expected
    assert expected != reference_answer(Phi3VForCausalLM.from_pretrained(tiny), processor, prompt, images[:1], 2)
    code, _, err = run(capsys, "--model", adapter, "--image", images[0], "--prompt", "x")
    assert code == 1 and f"--model {adapter} is a LoRA adapter: pass --model {tiny} --adapter {adapter}" in err


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_jsonl_batches_keep_the_order(tiny, images, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for image in images:
        (data / "images" / image.name).write_bytes(image.read_bytes())
    records = [
        {"id": "a", "conversations": [{"images": ["red.png"], "user": "Colour?", "assistant": "red"}]},
        {"id": "b", "source": "x", "conversations": [{"user": "Hello,\u2028how are you?"}]},  # no answer; U+2028 raw
        {"id": "c", "conversations": [
            {"images": ["red.png"], "user": "What is it?", "assistant": "A square."},
            {"images": ["green.jpg"], "user": "And <|image_2|>?", "assistant": ""}]},
        {"id": "d", "conversations": [{"images": ["red.png", "green.jpg"], "user": "Same?", "assistant": "no"}]},
        {"id": "e", "conversations": [{"user": "Text only.", "assistant": "ok"}]},
    ]
    write_jsonl(data / "test.jsonl", records)
    outputs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"pred{batch_size}.jsonl"
        code, stdout, err = run(capsys, "--model", tiny, "--input", data / "test.jsonl", "--output", out,
                                "--batch_size", batch_size, "--max_new_tokens", 6)
        assert code == 0 and stdout == "" and f"Wrote 5 predictions to {out}" in err
        assert "generating" in err  # the progress bar
        outputs[batch_size] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outputs[1] == outputs[3]  # batching (left padding, sorted by length) changes nothing
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in outputs[3]] == records
    assert all(isinstance(r["prediction"], str) for r in outputs[3])

    # The first record alone, as a prompt on the command line: the same answer.
    code, stdout, _ = run(capsys, "--model", tiny, "--image", images[0], "--prompt", "Colour?", "--max_new_tokens", 6)
    assert stdout.strip() == outputs[3][0]["prediction"]

    # --images_dir elsewhere; bad records are reported as FILE:LINE.
    moved = tmp_path / "elsewhere"
    (data / "images").rename(moved)
    code, _, err = run(capsys, "--model", tiny, "--input", data / "test.jsonl", "--output", tmp_path / "p.jsonl",
                       "--images_dir", moved, "--max_new_tokens", 2, "--no_tqdm")
    assert code == 0 and "generating" not in err
    write_jsonl(data / "bad.jsonl", [records[0], {"id": "z", "conversations": [{"images": ["nope.png"], "user": "?"}]}])
    code, _, err = run(capsys, "--model", tiny, "--input", data / "bad.jsonl", "--output", tmp_path / "q.jsonl",
                       "--images_dir", moved)
    assert code == 1 and f"{data / 'bad.jsonl'}:2: image 'nope.png' not found" in err
    assert not (tmp_path / "q.jsonl").exists()


def test_jsonl_batches_never_straddle_the_longrope_switch(tiny, images, tmp_path, monkeypatch):
    from phivision import generate
    from phivision.chat import conversation_prompt
    from phivision.tiny import tiny_config

    (tmp_path / "images").mkdir()
    for image in images:
        (tmp_path / "images" / image.name).write_bytes(image.read_bytes())
    records = [{"id": str(i), "conversations": [{"images": ["red.png"] * (i % 3), "user": "Colour? " * (5 * i)}]}
               for i in range(12)]
    write_jsonl(tmp_path / "test.jsonl", records)
    processor = Phi3VProcessor.from_pretrained(tiny)
    lengths = {}
    for record in records:
        prompt = conversation_prompt(record["conversations"], len(record["conversations"][0]["images"]), processor)
        sizes = [Image.open(tmp_path / "images" / name).size for name in record["conversations"][0]["images"]]
        lengths[prompt] = processor.num_prompt_tokens(prompt, sizes)
    limit = sorted(lengths.values())[5]
    model = Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer), original_max_position_embeddings=limit))
    batches = []

    def answers(model, processor, prompts, images, **kwargs):
        batches.append([lengths[prompt] for prompt in prompts])
        return ["x"] * len(prompts)

    monkeypatch.setattr(generate, "generate_answers", answers)
    generate.answer_file(model, processor, tmp_path / "test.jsonl", tmp_path / "out.jsonl", batch_size=4,
                         max_new_tokens=4, progress=False)
    assert sorted(n for batch in batches for n in batch) == sorted(lengths.values())
    assert all(max(batch) <= limit - 4 or min(batch) > limit or len(batch) == 1 for batch in batches)
    assert len(batches) > 3  # 12 prompts at 4 per batch, cut at the switch


def test_sampling_and_penalty_flags(tiny, images, capsys):
    base = ["--model", tiny, "--image", images[0], "--prompt", "Describe it.", "--max_new_tokens", 10]
    sampled = [run(capsys, *base, "--do_sample", "--temperature", 1.5, "--top_k", 50, "--top_p", 0.95, "--seed", 3)
               for _ in range(2)]
    greedy = run(capsys, *base)
    assert sampled[0][0] == 0 and sampled[0][1] == sampled[1][1]  # --seed makes sampling reproducible
    assert sampled[0][1] != greedy[1]
    penalised = run(capsys, *base, "--repetition_penalty", 1.3)
    assert penalised[0] == 0 and penalised[1].strip()
    # Text-only prompts have no image ids: the same answer as transformers' own repetition penalty.
    model, processor = Phi3VForCausalLM.from_pretrained(tiny), Phi3VProcessor.from_pretrained(tiny)
    code, out, _ = run(capsys, "--model", tiny, "--prompt", "Hello", "--repetition_penalty", 1.3,
                       "--max_new_tokens", 10)
    assert out.strip() == reference_answer(model, processor, PROMPT.format(tags="", text="Hello"), [],
                                           max_new_tokens=10, repetition_penalty=1.3)


def test_beam_search(tiny, images, capsys):
    from transformers.generation.utils import GenerationMixin

    code, out, _ = run(capsys, "--model", tiny, "--image", images[0], "--prompt", "Colour?", "--num_beams", 3,
                       "--max_new_tokens", 6)
    assert code == 0 and out.strip()  # printed at the end (generate streams no beam search)
    code, out, err = run(capsys, "--model", tiny, "--image", images[0], "--image", images[1], "--prompt", "Same?",
                         "--num_beams", 2, "--max_new_tokens", 6)
    if Phi3VForCausalLM._expand_inputs_for_generation is GenerationMixin._expand_inputs_for_generation:
        assert code == 1 and "--num_beams > 1 with several images in one prompt" in err
    else:  # the model repeats each prompt's images per beam itself
        assert code == 0 and out.strip()


def test_try_command(tiny, adapter, images, capsys):
    command = try_command("out dir/", "microsoft/Phi-3.5-vision-instruct", is_adapter=True, num_crops=16)
    assert command == ("python -m phivision.generate --model microsoft/Phi-3.5-vision-instruct --adapter 'out dir/' "
                       "--image path/to/image.jpg --prompt 'Describe the image.' --num_crops 16")
    assert try_command("out", None, is_adapter=False) == (
        "python -m phivision.generate --model out --image path/to/image.jpg --prompt 'Describe the image.'")
    with pytest.raises(ValueError, match="base_model"):
        try_command("out", None, is_adapter=True)
    # The printed commands run as they are.
    for command in (try_command(str(tiny), None, False, str(images[0])),
                    try_command(str(adapter), str(tiny), True, str(images[1]), num_crops=1)):
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "phivision.generate"]
        build_parser().parse_args(argv[3:])
        code, out, _ = run(capsys, *argv[3:], "--max_new_tokens", 3)
        assert code == 0 and out.endswith("\n")


def test_usage_errors(tiny, images, tmp_path, capsys):
    for argv in ([], ["--prompt", "x", "--input", "a.jsonl"], ["--input", "a.jsonl"],
                 ["--input", "a.jsonl", "--output", "b.jsonl", "--image", "c.png"],
                 ["--prompt", "x", "--num_crops", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(tiny), *argv])
        assert exit_info.value.code == 2
    code, _, err = run(capsys, "--model", tiny, "--image", tmp_path / "missing.png", "--prompt", "x")
    assert code == 1 and f"--image {tmp_path / 'missing.png'}: no such file" in err
    code, _, err = run(capsys, "--model", tiny, "--adapter", tmp_path, "--prompt", "x")
    assert code == 1 and f"--adapter {tmp_path}: no adapter_config.json" in err


def test_outputs_are_never_overwritten_unasked(tiny, images, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(images[0].read_bytes())
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "conversations": [{"images": ["red.png"], "user": "Colour?"}]}])
    (tmp_path / "out.jsonl").write_text("precious\n")
    base = ["--model", str(tiny), "--input", str(tmp_path / "in.jsonl"), "--max_new_tokens", "2", "--no_tqdm"]
    for output in ("out.jsonl", "in.jsonl"):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--output", str(tmp_path / output), "--overwrite"] if output == "in.jsonl"
                 else [*base, "--output", str(tmp_path / output)])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "exists: pass --overwrite" in err and "is the --input file" in err
    assert (tmp_path / "out.jsonl").read_text() == "precious\n"
    assert main([*base, "--output", str(tmp_path / "out.jsonl"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["id"] == "a"


def test_an_adapter_for_another_base_is_one_line(tiny, adapter, images, tmp_path, capsys):
    from test_merge_lora import other_base

    wider = other_base(tmp_path / "wider", intermediate_size=256)
    code, _, err = run(capsys, "--model", wider, "--adapter", adapter, "--image", images[0], "--prompt", "x")
    assert code == 1 and err.strip().splitlines()[-1].startswith(f"error: --adapter {adapter} does not fit --model")


def test_command_line_entry_point(tiny, images):
    result = subprocess.run(
        [sys.executable, "-m", "phivision.generate", "--model", str(tiny), "--image", str(images[0]), "--prompt",
         "What colour is it?", "--max_new_tokens", "8", "--dtype", "fp32", "--device", "cpu",
         "--attn_implementation", "eager"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    model, processor = Phi3VForCausalLM.from_pretrained(tiny), Phi3VProcessor.from_pretrained(tiny)
    expected = reference_answer(model, processor, PROMPT.format(tags="<|image_1|>\n", text="What colour is it?"),
                                images[:1])
    assert result.stdout.strip() == expected


def test_an_output_that_cannot_be_written_and_a_missing_model_stop_before_the_model_loads(tmp_path, capsys,
                                                                                           monkeypatch):
    from helpers import read_only_folder

    monkeypatch.setattr("phivision.generate.load_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "conversations": [{"user": "Hello?"}]}])
    base = ["--model", "microsoft/Phi-3.5-vision-instruct", "--input", str(tmp_path / "in.jsonl")]
    with read_only_folder() as parent:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--output", str(parent / "p.jsonl")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().endswith(
        f"error: --output {parent / 'p.jsonl'}: cannot write there (no permission to write in {parent})")
    (tmp_path / "predictions").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--output", str(tmp_path / "predictions"), "--overwrite"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().endswith(
        f"error: --output {tmp_path / 'predictions'} is a folder: give the file to write (e.g. "
        f"{tmp_path / 'predictions' / 'predictions.jsonl'})")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "nowhere" / "model"), "--prompt", "x"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().endswith(
        f"error: --model {tmp_path / 'nowhere' / 'model'}: no such folder")


def test_flash_attention_with_fp32_weights_falls_back_to_sdpa(tiny, images, capsys, monkeypatch):
    """flash-attn rejects fp32 tensors: on a GPU where it would run, --dtype fp32 loads SDPA, with a notice."""
    from phivision.phi3v import modeling

    monkeypatch.setattr(modeling, "flash_attn_unusable", lambda: None)  # an Ampere GPU with flash-attn installed
    loads = []
    original = Phi3VForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loads.append((kwargs["attn_implementation"], kwargs["dtype"]))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Phi3VForCausalLM, "from_pretrained", classmethod(from_pretrained))
    code, out, err = run(capsys, "--model", tiny, "--image", images[0], "--prompt", "What colour is it?",
                         "--max_new_tokens", 4, "--dtype", "fp32", "--attn_implementation", "flash_attention_2")
    assert code == 0 and out.strip()
    assert loads == [("sdpa", torch.float32)]
    assert "notice: --attn_implementation flash_attention_2 runs bf16/fp16 only" in err
