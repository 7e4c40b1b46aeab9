"""The native model: checkpoint layout, config round-trip, image embedding, attention, generation, training."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from phivision import Phi3VConfig, Phi3VForCausalLM
from phivision.tiny import build_tiny_processor, tiny_config

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
HUB_FILES = REFERENCE / "phi35v_hub_files"


def tokens_per_image(h: int, w: int) -> int:
    return (h * w + 1) * 144 + 1 + (h + 1) * 12


def image_inputs(crops_hw, max_crops=5, seed=0):
    """Random pixel_values with zero padding slots, and the matching image_sizes."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(len(crops_hw), max_crops, 3, 336, 336)
    for i, (h, w) in enumerate(crops_hw):
        pixel_values[i, : 1 + h * w] = torch.randn(1 + h * w, 3, 336, 336, generator=g)
    image_sizes = torch.tensor([[336 * h, 336 * w] for h, w in crops_hw])
    return pixel_values, image_sizes


def prompt_ids(crops_hw, text=(5, 6, 7)):
    """ids: text, image 1, text, image 2, ... text (image k as -k, as the processor writes them)."""
    ids = [1, *text]
    for k, (h, w) in enumerate(crops_hw, start=1):
        ids += [-k] * tokens_per_image(h, w) + [1, *text]
    return ids


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Phi3VForCausalLM(tiny_config()).eval()


def test_full_size_model_has_the_hub_checkpoint_keys_and_shapes():
    expected = {}
    for line in (REFERENCE / "phi35v_checkpoint_keys.tsv").read_text().splitlines() if REFERENCE.exists() else []:
        name, shape = line.split("\t")
        expected[name] = tuple(int(x) for x in shape.split("x"))
    config = Phi3VConfig(**json.loads((HUB_FILES / "config.json").read_text())) if HUB_FILES.exists() else Phi3VConfig()
    with torch.device("meta"):
        full = Phi3VForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    assert len(shapes) == 592
    assert sum(p.numel() for p in full.parameters()) == 4_146_621_440
    if expected:
        assert shapes == expected


@pytest.mark.skipif(not HUB_FILES.exists(), reason="shared/reference not present")
def test_hub_config_loads_and_saves_back_in_hub_form(tmp_path, caplog):
    hub = json.loads((HUB_FILES / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, Phi3VConfig)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["short_factor"] == hub["rope_scaling"]["short_factor"]
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24

    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    for key, value in hub.items():
        if key in ("transformers_version", "_attn_implementation", "_name_or_path", "auto_map"):
            continue
        assert saved[key] == value, key
    # The same entries, naming the Hub repo of the code (a local copy's folder name says nothing: the default).
    assert saved["auto_map"] == {key: f"microsoft/Phi-3.5-vision-instruct--{value}" for key, value in hub["auto_map"].items()}
    assert "vision_config" not in saved and "rope_parameters" not in saved


def test_requesting_flash_attention_without_flash_attn_falls_back_to_sdpa(caplog):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    model = Phi3VForCausalLM(tiny_config(attn_implementation="flash_attention_2"))
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_save_load_round_trip_gives_identical_logits_and_files(model, tmp_path):
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, Phi3VForCausalLM)
    crops = [(1, 2)]
    ids = torch.tensor([prompt_ids(crops)])
    pixel_values, image_sizes = image_inputs(crops)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        actual = loaded.eval()(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    assert torch.equal(expected, actual)
    loaded.save_pretrained(tmp_path / "b")
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_two_by_two_merge_order(model):
    embedding = model.model.vision_embed_tokens
    patches = torch.arange(576, dtype=torch.float).reshape(1, 576, 1)
    merged = embedding.merge_patches(patches)
    assert merged.shape == (1, 12, 12, 4)
    assert merged[0, 0, 0].tolist() == [0, 1, 24, 25]
    assert merged[0, 0, 1].tolist() == [2, 3, 26, 27]
    assert merged[0, 1, 0].tolist() == [48, 49, 72, 73]


def test_image_token_layout_sub_grid_then_glb_then_global_view(monkeypatch):
    """Features coded by crop and patch show where every merged token and separator lands."""
    embedding = Phi3VForCausalLM(tiny_config()).model.vision_embed_tokens
    dim = embedding.glb_GN.shape[-1] // 4

    def coded_features(pixel_values):  # value = crop index * 1000 + patch index, CLS first
        crops = pixel_values.shape[0]
        code = torch.arange(crops).reshape(-1, 1) * 1000 + torch.arange(-1, 576).reshape(1, -1)
        return code.float().unsqueeze(-1).expand(crops, 577, dim)

    monkeypatch.setattr(embedding.img_processor, "forward", coded_features)
    embedding.img_projection = torch.nn.Identity()
    with torch.no_grad():
        embedding.sub_GN.fill_(-1)
        embedding.glb_GN.fill_(-2)
    h, w = 2, 1
    pixel_values, image_sizes = image_inputs([(h, w)])
    tokens = embedding(pixel_values, image_sizes)[:, 0]  # first patch of each merged token
    assert tokens.shape[0] == tokens_per_image(h, w) == 12 * h * (12 * w + 1) + 1 + 12 * 13
    sub_grid = tokens[: 12 * h * (12 * w + 1)].reshape(12 * h, 12 * w + 1)
    assert (sub_grid[:, -1] == -1).all()  # sub_GN closes every row
    assert sub_grid[0, 0] == 1000  # crop 1 (first sub-crop), patch 0
    assert sub_grid[12, 0] == 2000  # row 12 starts the crop below (crop 2)
    assert sub_grid[1, 0] == 1000 + 48  # second merged row = patch row 2
    assert tokens[12 * h * (12 * w + 1)] == -2  # glb_GN
    global_view = tokens[-156:].reshape(12, 13)
    assert global_view[0, 0] == 0 and global_view[0, 1] == 2 and (global_view[:, -1] == -1).all()


def test_padded_crop_slots_do_not_change_the_output(model):
    crops = [(2, 1), (1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    pixel_values, image_sizes = image_inputs(crops, max_crops=17)
    garbage = pixel_values.clone()
    garbage[0, 3:] = 5.0
    garbage[1, 2:] = -5.0
    with torch.no_grad():
        clean = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        noisy = model(input_ids=ids, pixel_values=garbage, image_sizes=image_sizes).logits
    assert torch.equal(clean, noisy)


def test_mismatched_image_positions_raise_a_clear_error(model):
    crops = [(1, 1)]
    ids = torch.tensor([prompt_ids(crops)[:-10]])  # image run cut short
    pixel_values, image_sizes = image_inputs(crops, max_crops=2)
    with pytest.raises(ValueError, match="num_crops"):
        model(input_ids=torch.tensor([prompt_ids([(1, 2)])]), pixel_values=pixel_values, image_sizes=image_sizes)
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=ids)


def test_batch_with_right_padding_matches_single_rows(model):
    rows = [[(1, 1)], [(2, 1), (1, 1)]]
    singles = [torch.tensor([prompt_ids(r)]) for r in rows]
    length = max(s.shape[1] for s in singles)
    batch = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, s in enumerate(singles):
        batch[i, : s.shape[1]] = s[0]
        mask[i, : s.shape[1]] = 1
    all_crops = [c for r in rows for c in r]
    pixel_values, image_sizes = image_inputs(all_crops)
    with torch.no_grad():
        batched = model(input_ids=batch, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits
        start = 0
        for i, (r, s) in enumerate(zip(rows, singles)):
            single = model(
                input_ids=s, pixel_values=pixel_values[start : start + len(r)], image_sizes=image_sizes[start : start + len(r)]
            ).logits
            start += len(r)
            torch.testing.assert_close(batched[i, : s.shape[1]], single[0], atol=1e-5, rtol=1e-4)


def test_sdpa_and_eager_logits_agree():
    torch.manual_seed(0)
    sdpa = Phi3VForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    eager = Phi3VForCausalLM(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation == "eager"
    crops = [(1, 2)]
    ids = torch.tensor([prompt_ids(crops)])
    pixel_values, image_sizes = image_inputs(crops)
    with torch.no_grad():
        a = sdpa(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        b = eager(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_generate_with_and_without_cache_agree_and_images_only_in_prefill(model):
    crops = [(1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    pixel_values, image_sizes = image_inputs(crops, max_crops=2)
    vision_calls = []
    hook = model.model.vision_embed_tokens.register_forward_hook(lambda *a: vision_calls.append(1))
    common = dict(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=6, do_sample=False)
    try:
        cached = model.generate(**common, eos_token_id=None)
        assert len(vision_calls) == 1
        uncached = model.generate(**common, use_cache=False, eos_token_id=None)
    finally:
        hook.remove()
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, uncached)


def generation_steps_running_the_tower(model, **generate_kwargs) -> tuple[torch.Tensor, list[int]]:
    """generate()'s output, and the forward passes (numbered from 0) in which the vision tower ran."""
    steps, tower_steps = [], []
    hooks = [model.model.register_forward_pre_hook(lambda *a: steps.append(len(steps))),
             model.model.vision_embed_tokens.register_forward_hook(lambda *a: tower_steps.append(steps[-1]))]
    try:
        return model.generate(**generate_kwargs), tower_steps
    finally:
        for hook in hooks:
            hook.remove()


def test_generate_across_the_longrope_switch_reuses_the_prompts_image_features():
    """Past original_max_position_embeddings Phi-3 drops its cache and recomputes the whole sequence: with the image
    features of the prefill, not by running the vision tower again (under ZeRO-3/FSDP2 the other ranks, taking a decode
    step, would not join its collectives)."""
    crops = [(1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(original_max_position_embeddings=ids.shape[1] + 2)).eval()
    pixel_values, image_sizes = image_inputs(crops, max_crops=2)
    common = dict(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=6, do_sample=False,
                  eos_token_id=None)
    recomputed = []
    original = model.prepare_inputs_for_generation

    def prepare(*args, **kwargs):
        inputs = original(*args, **kwargs)
        recomputed.append("image_features" in inputs)
        return inputs

    model.prepare_inputs_for_generation = prepare
    cached, tower_steps = generation_steps_running_the_tower(model, **common)
    assert recomputed == [False, False, False, True, False, False]  # the switch: past limit + 1 tokens
    assert tower_steps == [0]  # the prefill only
    uncached, tower_steps = generation_steps_running_the_tower(model, **common, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, uncached)  # the same answer as recomputing everything at every step


def test_sharded_text_only_generation_runs_the_tower_at_prefill_only(monkeypatch):
    """Under sharded weights a text-only prompt runs the tower on a blank crop at prefill, as image prompts on other ranks
    do; at LongRoPE's switch it must not, as no rank does."""
    from phivision.phi3v import modeling

    ids = torch.tensor([[1, *range(5, 30)]])
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(original_max_position_embeddings=ids.shape[1] + 2)).eval()
    monkeypatch.setattr(modeling, "parameters_are_sharded", lambda module: True)
    output, tower_steps = generation_steps_running_the_tower(model, input_ids=ids, max_new_tokens=6, do_sample=False,
                                                             eos_token_id=None)
    assert output.shape[1] == ids.shape[1] + 6 and tower_steps == [0]


def test_generate_stops_on_end_token(model):
    crops = [(1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    pixel_values, image_sizes = image_inputs(crops, max_crops=2)
    free = model.generate(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=6, eos_token_id=None)
    first_new = int(free[0, ids.shape[1]])
    stopped = model.generate(
        input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=6, eos_token_id=[first_new]
    )
    assert stopped.shape[1] == ids.shape[1] + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_with_gradient_checkpointing_gives_finite_gradients(dtype):
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config()).to(dtype).train()
    model.model.vision_embed_tokens.img_processor.freeze_unused()
    model.activation_checkpointing_enable()
    crops = [(2, 1), (1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    labels = ids.clone()
    labels[:, :-3] = -100
    pixel_values, image_sizes = image_inputs(crops)
    loss = model(input_ids=ids, pixel_values=pixel_values.to(dtype), image_sizes=image_sizes, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("post_layernorm" in n or ".layers.2." in n for n in frozen)


@pytest.mark.parametrize("adapter", [False, True])
def test_checkpointing_with_frozen_vision_runs_no_vision_backward(adapter):
    """transformers' checkpointing hooks every sub-model's input embeddings; CLIP's must stay out."""
    from peft import LoraConfig, get_peft_model

    from phivision.training.modes import lora_target_modules

    model = Phi3VForCausalLM(tiny_config()).train()
    model.model.vision_embed_tokens.requires_grad_(False)
    if adapter:  # language-only LoRA, as --use_lora --freeze_vision_model sets it up
        model = get_peft_model(model, LoraConfig(target_modules=lora_target_modules(model, include_vision=False)))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inner = model.get_base_model() if adapter else model
    pixel_values, image_sizes = image_inputs([(1, 1)], max_crops=2)
    ids = torch.tensor([prompt_ids([(1, 1)])])
    assert not inner.model.vision_embed_tokens(pixel_values, image_sizes).requires_grad
    assert inner.model.embed_tokens(ids.clamp(min=0)).requires_grad  # what adapters + checkpointing need
    labels = ids.masked_fill(ids < 0, -100)
    model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_frozen_tower_runs_its_forward_once_per_step_under_checkpointing(reentrant):
    """FLOPs of the image embedding in one training step (forward + backward) under checkpointing: a frozen
    tower costs one forward; a trainable one is recomputed and differentiated (what checkpointing does)."""
    from torch.utils.flop_counter import FlopCounterMode

    pixel_values, image_sizes = image_inputs([(1, 1)], max_crops=2)
    ids = torch.tensor([prompt_ids([(1, 1)])])
    labels = ids.masked_fill(ids < 0, -100)
    vision = "Phi3VForCausalLM.model.vision_embed_tokens"

    def vision_flops(frozen: bool) -> tuple[int, int]:
        """(one forward of the image embedding, the image embedding's share of a training step)"""
        torch.manual_seed(0)
        model = Phi3VForCausalLM(tiny_config()).train()
        model.model.vision_embed_tokens.img_processor.freeze_unused()
        model.model.vision_embed_tokens.requires_grad_(not frozen)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        tower_layers = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
        assert all(layer.gradient_checkpointing != frozen for layer in tower_layers)
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        with torch.no_grad(), FlopCounterMode(display=False) as forward:
            model.model.vision_embed_tokens(pixel_values, image_sizes)
        with FlopCounterMode(display=False) as step:
            model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss.backward()
        return forward.get_total_flops(), sum(step.get_flop_counts()[vision].values())

    one_forward, frozen_step = vision_flops(frozen=True)
    assert frozen_step == one_forward > 0
    one_forward, trained_step = vision_flops(frozen=False)
    assert trained_step > 3 * one_forward  # forward, recomputed forward, backward (about twice a forward)


def test_precomputed_image_features_give_the_same_loss_without_running_the_tower(model):
    """`image_features` (a frozen tower's output, cached by --cache_vision_features) in place of pixel values."""
    from torch.utils.flop_counter import FlopCounterMode

    crops = [(2, 1), (1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    labels = ids.masked_fill(ids < 0, -100)
    pixel_values, image_sizes = image_inputs(crops)
    with torch.no_grad():
        loss = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss
        features = model.model.vision_embed_tokens(pixel_values, image_sizes)
        with FlopCounterMode(display=False) as flops:
            cached = model(input_ids=ids, image_features=features, labels=labels).loss
    assert torch.equal(loss, cached)
    assert "Phi3VForCausalLM.model.vision_embed_tokens" not in flops.get_flop_counts()


def test_answer_only_loss_equals_full_logits_cross_entropy(model):
    crops = [(1, 1)]
    ids = torch.tensor([prompt_ids(crops)])
    labels = ids.clone()
    labels[:, :-4] = -100
    pixel_values, image_sizes = image_inputs(crops, max_crops=2)
    with torch.no_grad():
        loss = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss
        logits = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, expected)


def test_text_only_training_batch_still_gives_every_vision_weight_a_gradient():
    """DDP/ZeRO need the same parameters to get gradients on every rank, images or not."""
    model = Phi3VForCausalLM(tiny_config()).train()
    model.model.vision_embed_tokens.img_processor.freeze_unused()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    vision = {n: p for n, p in model.model.vision_embed_tokens.named_parameters() if p.requires_grad}
    assert vision and all(p.grad is not None and not p.grad.any() for p in vision.values())
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, model.train()(input_ids=ids).logits)


@pytest.mark.parametrize("attn, boundaries", [("sdpa", True), ("eager", True), ("sdpa_packed", True),
                                              ("sdpa_packed", False)])
def test_packed_samples_give_the_same_losses_and_gradients_as_separate_samples(attn, boundaries):
    """Samples concatenated into one row (position ids restarting, no mask) stay independent.

    `boundaries`: cu_seq_lens/max_length passed along as pack_batch does, or position ids alone.
    """
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(attn_implementation=attn)).train()
    model.model.vision_embed_tokens.img_processor.freeze_unused()
    crops = [[(1, 1)], [], [(2, 1), (1, 1)]]
    samples = []
    for i, c in enumerate(crops):
        ids = torch.tensor([prompt_ids(c, text=(5 + i, 6, 7, 8 + i))])
        labels = ids.clone()
        labels[:, : -(3 + i)] = -100
        images = image_inputs(c, max_crops=5, seed=i) if c else (None, None)
        samples.append((ids, labels, *images))
    pixel_values = torch.cat([s[2] for s in samples if s[2] is not None])
    image_sizes = torch.cat([s[3] for s in samples if s[3] is not None])
    packed_ids = torch.cat([s[0] for s in samples], dim=1)
    packed_labels = torch.cat([s[1] for s in samples], dim=1)
    position_ids = torch.cat([torch.arange(s[0].shape[1]) for s in samples]).unsqueeze(0)
    lengths = [s[0].shape[1] for s in samples]
    cu_seq_lens = torch.tensor([0, lengths[0], sum(lengths[:2]), sum(lengths)], dtype=torch.int32)
    packing = {"position_ids": position_ids}
    if boundaries:
        packing.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max(lengths),
                       max_length_k=max(lengths))

    # Per-sample losses from the packed logits equal each sample's own loss.
    with torch.no_grad():
        logits = model(input_ids=packed_ids, **packing, pixel_values=pixel_values, image_sizes=image_sizes,
                       use_cache=False).logits[0]
        start = 0
        for ids, labels, pv, sizes in samples:
            n = ids.shape[1]
            packed_loss = torch.nn.functional.cross_entropy(logits[start : start + n - 1], labels[0, 1:])
            alone = model(input_ids=ids, pixel_values=pv, image_sizes=sizes, labels=labels).loss
            torch.testing.assert_close(packed_loss, alone, atol=1e-5, rtol=1e-5)
            start += n

    # The gradients of the token-mean loss equal those of the same tokens run sample by sample.
    model.zero_grad()
    model(input_ids=packed_ids, **packing, pixel_values=pixel_values, image_sizes=image_sizes,
          labels=packed_labels).loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = sum(int((s[1][:, 1:] != -100).sum()) for s in samples)
    for ids, labels, pv, sizes in samples:
        model(input_ids=ids, pixel_values=pv, image_sizes=sizes, labels=labels, num_items_in_batch=total).loss.backward()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4, msg=name)


def test_generate_expands_each_prompts_images_with_it():
    processor = build_tiny_processor(num_crops=1)
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer))).eval()
    colours = ["red", "blue", "green", "white"]
    images = [Image.new("RGB", (400 + 50 * i, 300), c) for i, c in enumerate(colours)]
    prompts = ["<|user|>\n<|image_1|>\n<|image_2|>\nA?<|end|>\n<|assistant|>\n", "<|user|>\nB?<|end|>\n<|assistant|>\n",
               "<|user|>\n<|image_1|>\n<|image_2|>\nC?<|end|>\n<|assistant|>\n"]
    inputs = processor(prompts, [images[:2], None, images[2:]], num_crops=1)
    seen = []
    embedding = model.model.vision_embed_tokens
    original = embedding.forward
    embedding.forward = lambda pixel_values, image_sizes: (seen.append(pixel_values.clone()), original(pixel_values, image_sizes))[1]
    model.generate(**inputs, max_new_tokens=2, num_beams=3, do_sample=False)
    one = inputs["pixel_values"]
    assert torch.equal(seen[0], torch.cat([one[0:2]] * 3 + [one[2:4]] * 3))
    # The expanded batch gives every copy the first-step logits of its prompt.
    ids, kwargs = model._expand_inputs_for_generation(3, False, inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"})
    embedding.forward = original
    with torch.no_grad():
        expanded = model(input_ids=ids, **kwargs).logits[:, -1]
        single = model(**inputs).logits[:, -1]
    torch.testing.assert_close(expanded, single.repeat_interleave(3, dim=0), atol=1e-5, rtol=0)


def test_the_vision_term_of_text_only_batches_stays_finite_in_fp16():
    """It sums ~10^6 image features; in fp16 that sum overflows, and 0 x inf would be NaN."""
    model = Phi3VForCausalLM(tiny_config()).to(torch.float16).train()
    with torch.no_grad():
        model.model.vision_embed_tokens.img_projection[2].weight.fill_(60.0)  # features near fp16's limit
    embeds = torch.zeros(1, 3, model.config.hidden_size, dtype=torch.float16)
    features = model.model.vision_embed_tokens(torch.zeros(1, 2, 3, 336, 336, dtype=torch.float16),
                                               torch.tensor([[336, 336]]))
    assert torch.isinf(features.sum())  # what a sum-then-zero would have multiplied
    term = model.model.unused_vision_term(embeds)
    assert torch.isfinite(term) and term.item() == 0.0 and term.requires_grad


@pytest.mark.parametrize("boundaries", [True, False])
def test_packed_sample_boundaries_are_read_once_per_forward_pass_and_no_mask_is_built(monkeypatch, boundaries):
    """"sdpa_packed" gets the boundaries as a list from the model (from cu_seq_lens or the position ids): no
    GPU-to-host copy in every layer, and no dense [1, 1, L, L] mask that the per-sample attention would ignore."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from phivision.attention import packed_sdpa_attention

    received = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        received.append((kwargs.get("packed_bounds"), attention_mask))
        return packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa_packed", spy)
    model = Phi3VForCausalLM(tiny_config(attn_implementation="sdpa_packed")).eval()
    ids = torch.tensor([[1, 5, 6, 7, 1, 8, 9]])
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    given = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4) if boundaries else {}
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]]), **given, use_cache=False)
    assert received == [([0, 4, 7], None)] * model.config.num_hidden_layers
    # A padded batch still gets SDPA's padding mask.
    received.clear()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6], [0, 1, 8]]), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
              use_cache=False)
    bounds, mask = received[0]
    assert bounds is None and mask is not None and not mask[1, 0, :, 0].any()


def test_with_sharded_weights_text_prompts_run_the_vision_tower_once_not_in_every_decoding_step(monkeypatch):
    """Under ZeRO-3/FSDP every rank joins the tower's weight gathers on prompts (some rank may have images), but
    no rank has images while decoding: a blank crop there would cost a CLIP pass and a gather per token."""
    import phivision.phi3v.modeling

    processor = build_tiny_processor(num_crops=1)
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer))).eval()
    calls = []
    embedding = model.model.vision_embed_tokens
    original = embedding.forward
    embedding.forward = lambda *args: (calls.append(1), original(*args))[1]
    inputs = processor(["<|user|>\nB?<|end|>\n<|assistant|>\n"], None)
    model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert calls == []  # weights not sharded: text-only prompts never run the tower
    monkeypatch.setattr(phivision.phi3v.modeling, "parameters_are_sharded", lambda module: True)
    model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert calls == [1]  # the prompt only
