"""phivision.generation: length-sorted batches, repetition penalty with image ids, precision, stop tokens."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from phivision.generation import (ImageSafeRepetitionPenalty, length_sorted_batches, processor_source, resolve_dtype,
                              use_chat_stop_tokens)
from phivision.phi3v.modeling import Phi3VForCausalLM
from phivision.tiny import build_tiny_processor, tiny_config


def test_length_sorted_batches_never_mix_longrope_regimes():
    lengths = [10, 20, 30, 40, 95, 99, 150, 160, 170]
    # limit 100, 8 new tokens: up to 92 stays short, 93..100 crosses while generating, above starts long
    assert length_sorted_batches(lengths, 3, 100, 8) == [[0, 1, 2], [3], [4], [5], [6, 7, 8]]
    assert length_sorted_batches(lengths, 4, None, 8) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert length_sorted_batches([], 4, 100, 8) == []


def test_length_sorted_batches_sort_by_length_and_keep_ties_in_order():
    assert length_sorted_batches([50, 10, 30, 10, 40], 2, None, 8) == [[1, 3], [2, 4], [0]]


def test_repetition_penalty_skips_image_ids():
    scores = torch.tensor([[1.0, -2.0, 3.0, 4.0, 0.5]])
    with_images = torch.tensor([[1, -1, -1, -1, 2, 2, -2, 4]])
    with pytest.raises((RuntimeError, IndexError)):  # transformers' own processor cannot take image ids
        RepetitionPenaltyLogitsProcessor(2.0)(with_images, scores.clone())
    result = ImageSafeRepetitionPenalty(2.0)(with_images, scores.clone())
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[1, 2, 2, 4]]), scores.clone())
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(result, torch.tensor([[1.0, -4.0, 1.5, 4.0, 0.25]]))


def test_chat_stop_tokens_replace_the_hubs_stale_eos():
    """The Hub's generation_config.json says EOS = 2 (</s>), which chat answers never produce: loading
    for generation takes the stop tokens from the tokenizer instead."""
    processor = build_tiny_processor()
    model = Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer))).eval()
    model.generation_config.eos_token_id = 2
    use_chat_stop_tokens(model, processor)
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.eos_token_id == processor.stop_token_ids == [
        end, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")]

    def answer_end(module, inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., end] = 0
        return forced

    hook = model.lm_head.register_forward_hook(answer_end)
    try:
        out = model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=5, do_sample=False)
    finally:
        hook.remove()
    assert out[0, 3:].tolist() == [end]


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, dtype):
    """V100 (7.0) and T4 (7.5) emulate bf16, slowly: fp16 there; A100 (8.0), H100 (9.0): bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == dtype
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cuda") == torch.float16


def test_processor_source_prefers_the_adapter_folder(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert processor_source("base", None) == "base"
    assert processor_source("base", str(adapter)) == "base"  # no processor saved with the adapter
    (adapter / "preprocessor_config.json").write_text("{}")
    assert processor_source("base", str(adapter)) == str(adapter)
