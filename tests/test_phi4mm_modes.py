"""Phi-4-multimodal's training modes (phivision.phi4mm.modes) on a tiny transformers-native Phi4MultimodalForCausalLM.

The tiny model keeps the real image geometry (448-pixel crops of 14-pixel patches: a 1x1-crop image is 545
image tokens) with small hidden sizes. Its checkpoint is written as the Hub's is: weights in bf16, and the vision
LoRA as a `vision-lora/` PEFT folder whose keys have no `base_model.model.` prefix (transformers' conversion script).
Run as a script on two ranks (tests/forked.py), this file is the DDP worker of test_text_only_batches_train_under_ddp.
"""

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from forked import forked_run
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

from phivision.phi4mm.modes import (
    SPEECH_PREFIX,
    answer_loss,
    apply_vision_lora,
    causal_lm,
    continue_vision_lora,
    lora_target_modules,
    lora_target_pattern,
    prepare_for_training,
    restore_speech_weights,
    used_vision_layers,
    vision_module,
    with_vision_term,
)

IMAGE_TOKEN, AUDIO_TOKEN = 500, 501
TOKENS_PER_IMAGE = 545  # a 1x1-crop image at crop 448: 256 global + 256 sub-crop + 16 + 16 row ends + 1 separator
# The shipped vision-lora's target_modules (transformers' convert_phi4_multimodal_weights_to_hf.py writes it).
SHIPPED_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"


def tiny_config(**overrides) -> Phi4MultimodalConfig:
    """Phi-4-MM's structure at toy sizes (tied embeddings, as on the Hub): 2 LM layers, 3 SigLIP layers (feature
    layer -2 leaves the last unused)."""
    return Phi4MultimodalConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=[2], tie_word_embeddings=True,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=448, patch_size=14, crop_size=448, image_token_id=IMAGE_TOKEN),
        audio_config=dict(hidden_size=32, intermediate_size=32, num_blocks=1, num_attention_heads=2,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                          audio_token_id=AUDIO_TOKEN),
        **overrides,
    )


def tiny_model(seed: int = 0, **overrides) -> Phi4MultimodalForCausalLM:
    torch.manual_seed(seed)
    return Phi4MultimodalForCausalLM(tiny_config(**overrides))


def images(count: int, seed: int = 0) -> dict:
    """What Phi4MultimodalImageProcessor gives for `count` 1x1-crop images (say 64x64): the global view and one
    sub-crop each, every patch real."""
    generator = torch.Generator().manual_seed(seed)
    return {"image_pixel_values": torch.randn(count, 2, 3, 448, 448, generator=generator),
            "image_sizes": torch.tensor([[448, 448]] * count),
            "image_attention_mask": torch.ones(count, 2, 32, 32)}


def sample(seed: int, prompt: int, answer: int, with_image: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: text, the image's tokens, more text, then the answer."""
    generator = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(3, IMAGE_TOKEN, (n,), generator=generator).tolist()  # noqa: E731
    ids = [1, *words(2), *([IMAGE_TOKEN] * TOKENS_PER_IMAGE if with_image else []), *words(prompt), *words(answer), 2]
    return ids, [-100] * (len(ids) - answer - 1) + ids[-answer - 1 :]


def padded_batch(samples: list[tuple[list[int], list[int]]]) -> dict:
    """Right-padded rows with their attention mask."""
    width = max(len(ids) for ids, _ in samples)
    pad = lambda row, value: row + [value] * (width - len(row))  # noqa: E731
    return {"input_ids": torch.tensor([pad(ids, 0) for ids, _ in samples]),
            "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in samples]),
            "labels": torch.tensor([pad(labels, -100) for _, labels in samples])}


def packed_batch(samples: list[tuple[list[int], list[int]]]) -> dict:
    """One row holding the samples one after the other, position ids restarting at each, no attention mask."""
    return {"input_ids": torch.tensor([[t for ids, _ in samples for t in ids]]),
            "position_ids": torch.tensor([[p for ids, _ in samples for p in range(len(ids))]]),
            "labels": torch.tensor([[t for _, labels in samples for t in labels]])}


def image_batch(seed: int = 0) -> dict:
    return {**padded_batch([sample(seed, 4, 3, True)]), **images(1, seed)}


def text_batch(seed: int = 0) -> dict:
    return padded_batch([sample(seed, 6, 3, False), sample(seed + 1, 3, 2, False)])


def write_hub_vision_lora(model: Phi4MultimodalForCausalLM, folder: Path, rank: int = 4, seed: int = 1) -> dict:
    """A vision-lora/ folder as the Hub ships it: PEFT's adapter_config.json, weights keyed like the model's modules
    (no `base_model.model.` prefix, no adapter name), random A and B. Returns the weights."""
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=SHIPPED_TARGETS, lora_dropout=0.0,
               task_type="CAUSAL_LM").save_pretrained(str(folder))
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in model.named_modules():
        if re.fullmatch(SHIPPED_TARGETS, name):
            weights[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            weights[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny base checkpoint in the Hub's layout: bf16 weights and a vision-lora/ folder. Tests must not write into it."""
    folder = tmp_path_factory.mktemp("phi4mm") / "base"
    model = tiny_model()
    model.to(torch.bfloat16).save_pretrained(folder)
    write_hub_vision_lora(model, folder / "vision-lora")
    return folder


def load(checkpoint: Path, **kwargs) -> Phi4MultimodalForCausalLM:
    return Phi4MultimodalForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs)


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def gradients(model) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def train_steps(model, batches: list[dict], lr: float = 1e-2) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        loss = answer_loss(model, with_vision_term(model, batch))
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ----- targets and freezing


def test_lora_targets_are_the_shipped_adapters_and_the_vision_layers_that_run():
    model = tiny_model()
    language = lora_target_modules(model, include_vision=False)
    assert language == [name for name, _ in model.named_modules() if re.fullmatch(SHIPPED_TARGETS, name)]
    assert len(language) == 2 * 4  # 2 layers x qkv_proj, o_proj, gate_up_proj, down_proj
    assert used_vision_layers(model) == 2  # hidden state -2 of 3 layers: the output of layer 2 of 3
    vision = sorted(set(lora_target_modules(model, include_vision=True)) - set(language))
    tower = "model.embed_tokens_extend.image_embed.img_processor.encoder.layers"
    expected = [f"{tower}.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    expected += ["model.embed_tokens_extend.image_embed.img_projection_down",
                 "model.embed_tokens_extend.image_embed.img_projection_up"]
    assert vision == sorted(expected)
    # The speech encoder's MLPs are gate_up_proj/down_proj too: targets by suffix would put adapters on them.
    assert [n for n, _ in model.named_modules() if n.startswith(SPEECH_PREFIX) and n.endswith("gate_up_proj")]


def test_every_lora_adapter_gets_a_gradient_from_an_image_batch():
    """Under DDP an adapter that never gets a gradient fails the run: each target must reach the loss."""
    model = tiny_model()
    prepare_for_training(model)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=lora_target_modules(model, include_vision=True),
                                             init_lora_weights="gaussian"))
    answer_loss(model, image_batch()).backward()
    missing = [name for name, grad in gradients(model).items() if grad is None]
    assert not missing and len(gradients(model)) == 2 * (8 + 14)


def test_vision_module_is_the_whole_image_embedding():
    model = tiny_model()
    embedding = vision_module(model)
    names = {name for name, _ in embedding.named_parameters()}
    assert {"img_processor.embeddings.patch_embedding.weight", "img_projection_up.weight",
            "img_projection_down.weight", "global_img_feature_extensor", "sub_img_feature_extensor"} <= names
    assert vision_module(get_peft_model(model, LoraConfig(r=2, target_modules=["qkv_proj"]))) is embedding


def test_prepare_for_training_leaves_only_weights_that_get_a_gradient_and_no_speech_encoder():
    model = tiny_model()
    prepare_for_training(model)
    assert not [name for name, _ in model.named_parameters() if name.startswith(SPEECH_PREFIX)]
    assert model.model.embed_tokens_extend.audio_embed is None
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    tower = "model.embed_tokens_extend.image_embed.img_processor."
    assert frozen and all(n.startswith((tower + "encoder.layers.2.", tower + "post_layernorm", tower + "head"))
                          for n in frozen)
    model.train()
    answer_loss(model, image_batch()).backward()
    assert [name for name, grad in gradients(model).items() if grad is None] == []


# ----- the speech encoder's weights in a saved model


def test_a_saved_full_model_holds_the_base_speech_weights_bit_for_bit(checkpoint, tmp_path):
    model = load(checkpoint)
    prepare_for_training(model)
    assert not any(name.startswith(SPEECH_PREFIX) for name in model.state_dict())
    train_steps(model, [image_batch(), text_batch()])
    out = tmp_path / "out"
    model.save_pretrained(out, state_dict=restore_speech_weights(model.state_dict(), checkpoint))

    with safe_open(checkpoint / "model.safetensors", "pt") as base, safe_open(out / "model.safetensors", "pt") as saved:
        speech = [key for key in base.keys() if key.startswith(SPEECH_PREFIX)]
        assert speech and set(speech) <= set(saved.keys())
        for key in speech:
            a, b = base.get_tensor(key), saved.get_tensor(key)
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16)), key
        name = "model.layers.0.self_attn.qkv_proj.weight"
        assert not torch.equal(base.get_tensor(name).float(), saved.get_tensor(name).float())  # the training is saved
    reloaded = load(out)  # transformers' own class, every weight found in the folder
    assert torch.equal(reloaded.state_dict()[speech[0]], base_tensor(checkpoint, speech[0]).float())


def base_tensor(checkpoint: Path, key: str) -> torch.Tensor:
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        return f.get_tensor(key)


def test_restore_speech_weights_reads_a_sharded_checkpoint_and_keeps_a_state_dict_that_has_them(checkpoint, tmp_path):
    model = load(checkpoint)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    state = model.state_dict()
    stripped = {k: v for k, v in state.items() if not k.startswith(SPEECH_PREFIX)}
    restored = restore_speech_weights(stripped, sharded)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert restore_speech_weights(state, tmp_path / "not-there") == state  # nothing to read


# ----- text-only batches


def test_a_text_only_batch_gives_every_trainable_vision_weight_a_zero_gradient():
    model = tiny_model()
    prepare_for_training(model)
    model.train()
    batch = text_batch()
    without_loss = answer_loss(model, batch)
    without_loss.backward()
    vision = [name for name, _ in model.named_parameters() if name.startswith("model.embed_tokens_extend.image_embed.")]
    without = gradients(model)
    assert all(without[name] is None for name in vision if name in without)  # what DDP would wait for
    model.zero_grad()
    with_loss = answer_loss(model, with_vision_term(model, batch))
    assert torch.equal(with_loss, without_loss)
    with_loss.backward()
    with_term = gradients(model)
    trainable_vision = [name for name in vision if name in with_term]
    assert trainable_vision and all(with_term[name] is not None and not with_term[name].any() for name in trainable_vision)
    assert all(torch.allclose(with_term[n], without[n], atol=1e-7) for n in with_term if n not in vision)  # the rest


def test_the_vision_term_changes_nothing_with_images_in_evaluation_or_with_vision_frozen():
    model = tiny_model()
    prepare_for_training(model)
    model.train()
    batch = image_batch()
    assert with_vision_term(model, batch) is batch
    model.eval()
    batch = text_batch()
    assert with_vision_term(model, batch) is batch
    model.train()
    vision_module(model).requires_grad_(False)
    assert with_vision_term(model, batch) is batch


def test_text_only_batches_train_under_ddp():
    """2 ranks (gloo; forked with torchrun's environment, tests/forked.py), DDP with find_unused_parameters=False:
    rank 0 gets text only, rank 1 images, 2 steps."""
    run = forked_run(Path(__file__), ["ddp"], nproc=2, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert run.stdout.count("ddp ok") == 2


def ddp_worker() -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_model()  # the same weights on both ranks
    prepare_for_training(model)
    start = vision_module(model).img_projection_up.weight.detach().clone()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    ddp.train()
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        batch = text_batch(step) if rank == 0 else image_batch(step)
        loss = answer_loss(ddp, with_vision_term(ddp, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = vision_module(model).img_projection_up.weight.detach()
    gathered = [torch.zeros_like(weight) for _ in range(2)]
    dist.all_gather(gathered, weight)
    assert torch.equal(gathered[0], gathered[1]) and not torch.equal(weight, start)  # trained, and in step
    print("ddp ok", flush=True)
    del ddp, optimizer  # DDP's reducer goes before the process group it uses (else the exit can hang)
    dist.barrier()
    dist.destroy_process_group()


# ----- answer-only logits


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_answer_loss_equals_the_full_logits_loss_on_a_padded_batch(attention):
    model = tiny_model(attn_implementation=attention)
    prepare_for_training(model)
    model.train()
    batch = {**padded_batch([sample(0, 4, 3, True), sample(1, 9, 5, False), sample(2, 2, 1, True)]), **images(2)}
    full = model(**batch).loss
    full.backward()
    expected = gradients(model)
    model.zero_grad()
    loss = answer_loss(model, batch)
    loss.backward()
    assert torch.allclose(loss, full, atol=1e-6, rtol=0)
    assert all(torch.allclose(g, expected[n], atol=1e-6, rtol=1e-5) for n, g in gradients(model).items())
    scaled = answer_loss(model, batch, num_items_in_batch=20)  # the Trainer's count over accumulated batches
    assert torch.allclose(scaled * 20, loss * (batch["labels"][:, 1:] != -100).sum(), atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_answer_loss_of_a_packed_row_equals_the_samples_apart(attention):
    """Position ids restarting per sample and no attention mask keep packed samples apart (transformers' mask
    finds them), as long as the model runs without a KV cache: answer_loss asks for none."""
    model = tiny_model(attn_implementation=attention)
    prepare_for_training(model)
    model.train()
    samples = [sample(0, 4, 3, True), sample(1, 9, 5, False), sample(2, 2, 2, False)]
    apart = {**padded_batch(samples), **images(1)}
    reference = model(**apart, use_cache=False).loss
    reference.backward()
    expected = gradients(model)
    model.zero_grad()
    packed = {**packed_batch(samples), **images(1)}
    loss = answer_loss(model, packed)
    loss.backward()
    assert torch.allclose(loss, reference, atol=1e-6, rtol=0)
    assert all(torch.allclose(g, expected[n], atol=1e-6, rtol=1e-5) for n, g in gradients(model).items())
    # With the config's use_cache=True the model builds a cache first, and the mask then treats the row as one
    # sequence: the samples attend to each other.
    with torch.no_grad():
        assert not torch.allclose(model(**packed).loss, reference, atol=1e-4)


# ----- the shipped vision LoRA


def test_continue_vision_lora_loads_every_shipped_weight_trainable(checkpoint):
    model = continue_vision_lora(load(checkpoint), checkpoint)
    shipped = load_file(checkpoint / "vision-lora" / "adapter_model.safetensors")
    loaded = {name.removeprefix("base_model.model.").replace(".default.", "."): p
              for name, p in model.named_parameters() if ".lora_" in name}
    assert loaded.keys() == shipped.keys()
    assert all(torch.equal(loaded[k].detach(), shipped[k]) and loaded[k].requires_grad for k in shipped)
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".lora_" not in name)
    before = logits(model, image_batch())
    train_steps(model, [image_batch(0), image_batch(1)])
    assert not torch.allclose(logits(model, image_batch()), before, atol=1e-4)


def test_the_official_recipe_trains_the_vision_lora_and_the_image_embedding(checkpoint):
    """Microsoft's sample: the shipped vision LoRA and the whole image embedding trainable, the rest frozen.
    prepare_for_training comes after the image embedding is made trainable, or it would unfreeze SigLIP's unused
    last layer and head, which never get a gradient."""
    model = continue_vision_lora(load(checkpoint), checkpoint)
    vision_module(model).requires_grad_(True)
    prepare_for_training(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or ".image_embed." in name for name in trainable)
    assert any(".image_embed.img_processor.encoder.layers.0." in name for name in trainable)
    model.train()
    answer_loss(model, image_batch()).backward()
    assert [name for name, grad in gradients(model).items() if grad is None] == []
    before = logits(model, image_batch())
    train_steps(model, [image_batch(1), text_batch(2)])
    assert not torch.allclose(logits(model, image_batch()), before, atol=1e-4)


def test_a_new_lora_learns_on_top_of_the_shipped_vision_lora(checkpoint, tmp_path):
    batch = image_batch()
    base_logits = logits(load(checkpoint), batch)
    with_vision_lora = logits(continue_vision_lora(load(checkpoint), checkpoint), batch)  # the LoRA unmerged
    assert not torch.allclose(with_vision_lora, base_logits, atol=1e-3)

    model = apply_vision_lora(load(checkpoint), checkpoint)
    assert isinstance(model, Phi4MultimodalForCausalLM) and not any(".lora_" in n for n, _ in model.named_parameters())
    prepare_for_training(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_pattern(model, include_vision=True))
    model = get_peft_model(model, config)  # B starts at zero: the new adapter adds nothing yet
    assert torch.allclose(logits(model, batch), with_vision_lora, atol=1e-5)  # (a) base + vision LoRA, not base

    train_steps(model, [image_batch(1), text_batch(2), image_batch(3)])
    trained = logits(model, batch)
    assert not torch.allclose(trained, with_vision_lora, atol=1e-3)  # (b)

    model.save_pretrained(tmp_path / "adapter")  # a LoRA run's output, merged later on a fresh base
    fresh = apply_vision_lora(load(checkpoint), checkpoint)  # with its speech encoder, unlike the trained model
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns of adapter weights the folder lacks
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert not any(".lora_" in name for name, _ in reloaded.named_parameters() if SPEECH_PREFIX in name)
    assert torch.allclose(logits(reloaded, batch), trained, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert torch.allclose(logits(merged, batch), trained, atol=1e-4)  # (c) base + vision LoRA + new adapter
    assert causal_lm(merged) is merged


def test_a_relative_checkpoint_path_spelt_like_a_hub_id_is_read_from_the_folder(checkpoint, monkeypatch):
    """`make demo-phi4mm` passes demo_output/tiny-phi4mm: a folder there wins over the Hub (which is offline)."""
    monkeypatch.chdir(checkpoint.parent.parent)
    relative = f"{checkpoint.parent.name}/{checkpoint.name}"  # org/name
    batch = image_batch()
    expected = logits(apply_vision_lora(load(checkpoint), checkpoint), batch)
    assert torch.equal(logits(apply_vision_lora(load(checkpoint), relative), batch), expected)
    stripped = {k: v for k, v in load(checkpoint).state_dict().items() if not k.startswith(SPEECH_PREFIX)}
    assert any(k.startswith(SPEECH_PREFIX) for k in restore_speech_weights(stripped, relative))


def test_lora_target_pattern_matches_the_targets_only():
    model = tiny_model()
    targets = lora_target_modules(model, include_vision=True)
    pattern = lora_target_pattern(model, include_vision=True)
    assert [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)] == targets


def test_qlora_trains_a_new_adapter_on_a_4bit_base_with_the_vision_lora_merged(checkpoint):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training

    from phivision.training.modes import quantization_config

    model = load(checkpoint, quantization_config=quantization_config(torch.bfloat16))
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "Linear4bit"
    model = apply_vision_lora(model, checkpoint)  # merged into the 4-bit weights: no LoRA layers left in the base
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    prepare_for_training(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # as phivision.training.modes.setup_mode does
            module.support_avx512bf16_for_cpu = False
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(model, include_vision=True),
                        init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in n for n in adapters)
    train_steps(model, [image_batch(), text_batch()])
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), adapters[n])]
    assert len(changed) == len(adapters)


if __name__ == "__main__" and sys.argv[1:] == ["ddp"]:
    ddp_worker()


def test_siglip_attends_both_ways_under_sdpa_as_under_eager():
    """transformers' vision attention says is_causal=True, which SDPA applies when no patch is padding: the tower's
    features then depend on the kernel. The family's load path makes it bidirectional, as eager (and the released
    model) run it."""
    from phivision.phi4mm.modes import bidirectional_vision_attention

    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 448, 448)
    mask = torch.ones(1, 32, 32, dtype=torch.bool)  # no padding: the mask is dropped
    features = {}
    for attention in ("eager", "sdpa", "sdpa fixed"):
        model = tiny_model(attn_implementation=attention.split()[0]).eval()
        if attention.endswith("fixed"):
            bidirectional_vision_attention(model)
        tower = vision_module(model).img_processor
        with torch.no_grad():
            features[attention] = tower(pixels, patch_attention_mask=mask).last_hidden_state
    assert not torch.allclose(features["sdpa"], features["eager"], atol=1e-3)  # what transformers' class does
    torch.testing.assert_close(features["sdpa fixed"], features["eager"], rtol=1e-4, atol=1e-4)
