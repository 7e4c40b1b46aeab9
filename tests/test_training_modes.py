"""phivision.training.modes: what each training mode trains."""

import pytest
import torch

from phivision.training.modes import lora_target_modules


@pytest.fixture(scope="module")
def tiny_model():
    from phivision.phi3v.modeling import Phi3VForCausalLM
    from phivision.tiny import tiny_config

    torch.manual_seed(0)
    return Phi3VForCausalLM(tiny_config()).eval()


def test_lora_target_modules(tiny_model):
    with_vision = lora_target_modules(tiny_model, include_vision=True)
    without = lora_target_modules(tiny_model, include_vision=False)
    assert len(set(with_vision)) == len(with_vision)
    modules = dict(tiny_model.named_modules())
    assert all(isinstance(modules[name], torch.nn.Linear) for name in with_vision)

    language = ["lm_head"] + [
        f"model.layers.{i}.{leaf}"
        for i in range(tiny_model.config.num_hidden_layers)
        for leaf in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    assert sorted(without) == sorted(language)
    assert not any("vision_embed_tokens" in name for name in without)

    vision = [name for name in with_vision if "vision_embed_tokens" in name]
    assert sorted(with_vision) == sorted(language + vision)
    embed = "model.vision_embed_tokens"
    assert f"{embed}.img_projection.0" in vision and f"{embed}.img_projection.2" in vision
    clip = [name for name in vision if ".encoder.layers." in name]
    assert len(vision) == 2 + len(clip)
    tower = tiny_model.model.vision_embed_tokens.img_processor
    assert len(tower.vision_model.encoder.layers) == 3 and tower.num_layers_used == 2
    expected_clip = {
        f"encoder.layers.{i}.{leaf}"
        for i in (0, 1)
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2")
    }
    assert {name.split(".vision_model.", 1)[1] for name in clip} == expected_clip
    assert len(clip) == 12
    assert not any(".encoder.layers.2." in name for name in with_vision)
    assert not any("post_layernorm" in name or "patch_embedding" in name for name in with_vision)


@pytest.fixture
def half_only_attention(monkeypatch):
    """A stand-in for transformers' flash attention: fp32 queries go to the dtype `get_target_dtype` picks (the
    autocast dtype, else the layer's weights'), and like flash-attn it refuses what is still fp32. Gives the dtypes it
    saw and, for each call, (whether gradients were on, whether autocast's cache was on)."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from phivision.training import modes

    seen, grad_and_cache = [], []

    def half_only(module, query, key, value, *args, **kwargs):
        dtype = get_target_dtype(query, module) or query.dtype
        seen.append(dtype)
        grad_and_cache.append((torch.is_grad_enabled(), torch.is_autocast_cache_enabled()))
        if dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16, got {dtype}")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("half_only", half_only)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    ALL_MASK_ATTENTION_FUNCTIONS.register("half_only", sdpa_mask)
    monkeypatch.setattr(modes, "training_attention", lambda flash, packing: "half_only")
    return seen, grad_and_cache


@pytest.mark.parametrize("mode", [["--deepspeed", "none"], ["--deepspeed", "none", "--freeze_vision_model"],
                                  ["--use_lora", "--lora_rank", "4"]], ids=["full", "frozen vision", "LoRA"])
def test_evaluation_before_and_after_training_feeds_the_kernel_half_precision(tiny, shapes, tmp_path, mode,
                                                                              half_only_attention):
    """Full fine-tuning keeps fp32 weights (AMP): evaluating them must still run in the training precision, without
    autocast's cache, which would hold a 16-bit copy of every fp32 weight for the whole evaluation."""
    from test_recipes import run_recipe

    run_recipe("finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
               str(shapes), "--output_dir", str(tmp_path / "out"), "--bf16", "--batch_size", "2",
               "--batch_size_per_gpu", "2", "--max_steps", "1", "--max_eval_samples", "2", *mode)
    assert (tmp_path / "out" / "eval_before.json").is_file() and (tmp_path / "out" / "eval_after.json").is_file()
    seen, grad_and_cache = half_only_attention
    assert seen and set(seen) == {torch.bfloat16}
    # The evaluation before training: every call until training's first. (The evaluation after training runs the
    # Trainer's wrapped forward, with accelerate's own autocast and its cache: the 16-bit copies training held.)
    before = grad_and_cache[: next(i for i, (grad, _) in enumerate(grad_and_cache) if grad)]
    assert before and not any(cache for _, cache in before)


def test_weights_are_loaded_in_the_precision_the_mode_trains(tiny, tmp_path, monkeypatch):
    """LoRA's base and DeepSpeed's weights load in half precision (DeepSpeed keeps its own fp32 master copy);
    plain AMP updates fp32 weights."""
    from phivision.training import parse_args
    from phivision.training.modes import load_for_training, load_processor

    processor = load_processor(str(tiny))
    for argv, dtype in ((["--use_lora", "--bf16"], torch.bfloat16), (["--deepspeed", "none", "--bf16"], torch.float32)):
        args = parse_args(argv=["--model_name_or_path", str(tiny), "--output_dir", str(tmp_path), *argv])
        model = load_for_training(args, processor)
        assert next(p for n, p in model.named_parameters() if "qkv_proj.weight" in n or "qkv_proj.base_layer" in n
                    ).dtype == dtype
    args = parse_args(argv=["--model_name_or_path", str(tiny), "--output_dir", str(tmp_path), "--deepspeed", "none",
                            "--bf16"])
    args.training.deepspeed = "ds_config_zero2.json"  # as under torchrun: only the dtype choice is looked at here
    assert load_for_training(args, processor).model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("argv, placed", [(["--use_lora"], True), (["--use_qlora"], True), (["--deepspeed", "none"], False)])
def test_adapter_bases_load_straight_onto_the_trainers_device(tiny, tmp_path, monkeypatch, argv, placed):
    """On a GPU, LoRA and QLoRA bases load onto the device the Trainer chose for this process (not LOCAL_RANK, not
    the host first); full fine-tuning loads fp32 weights on the host for AMP (or DeepSpeed) to place."""
    from phivision.phi3v.modeling import Phi3VForCausalLM
    from phivision.training import modes, parse_args

    args = parse_args(argv=["--model_name_or_path", str(tiny), "--output_dir", str(tmp_path), *argv])
    device = args.training.device  # what the Trainer chose for this process
    monkeypatch.setenv("LOCAL_RANK", "3")  # one visible GPU per task (SLURM): cuda:3 does not exist
    monkeypatch.setattr(modes.torch.cuda, "is_available", lambda: True)
    received = {}

    def spy(path, **kwargs):
        received.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Phi3VForCausalLM, "from_pretrained", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        modes.load_for_training(args, modes.load_processor(str(tiny)))
    assert received.get("device_map") == ({"": device} if placed else None)
