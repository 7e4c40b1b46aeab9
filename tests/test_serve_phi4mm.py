"""What vLLM reads in a fine-tuned Phi-4-multimodal folder we write, reproduced on CPU (vLLM is not installed here).

vLLM serves a transformers-native Phi-4-MM folder (config.json `architectures` ["Phi4MultimodalForCausalLM"]) with
vllm/model_executor/models/phi4_multimodal.py (registry.py maps "Phi4MultimodalForCausalLM" to it; the remote-code
layout, "Phi4MMForCausalLM", goes to phi4mm.py). The rules below are that file's, read at vllm-project/vllm
03356f8cb59ba27f3d0ce8866d7516b5e32cff65 (the same `hf_to_vllm_mapper` and `load_weights` in later versions):

- `load_weights`: `AutoWeightsLoader(self).load_weights(weights, mapper=hf_to_vllm_mapper)`. The mapper
  (utils.py `WeightsMapper._map_name`) applies each matching substring rule, then each matching prefix rule, once.
  The loader sends each name to the child module it starts with (a module's own `load_weights` where it has one)
  and raises on a name no module or parameter has; vLLM's model loader then raises on any parameter left
  unloaded ("Following weights were not initialized from checkpoint").
- `language_model`: vLLM's Phi3ForCausalLM (llama.py), fused `qkv_proj` and `gate_up_proj` as transformers'
  Phi-4 stores them, `lm_head` tied to `embed_tokens` (not a parameter, and an `lm_head.weight` on disk would
  match no module of the outer model).
- `image_embed`: `Idefics2VisionTransformer(vision_config, require_post_norm=False,
  num_hidden_layers_override=layers up to feature_layer)`, whose `load_weights` (idefics2_vision_model.py) skips
  `head.`, `post_layernorm.` and layers past the override, and stacks q/k/v into `qkv_proj`; then the projector
  `img_projection.{up,down}` and the two extensors.
- `audio_embed`: `Phi4MMAudioEmbedding.load_weights` stacks q/k/v into `qkv_proj` and looks every other name up
  in its parameters (a missing one is a KeyError); its conv, subsampling and relative-bias modules are
  transformers' own classes, imported by vLLM.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import built_once
from safetensors import safe_open
from test_phi4mm_recipes import run_once

from phivision.phi4mm.config_file import hub_form, write_hub_form
from phivision.phi4mm.modes import SPEECH_PREFIX, VISION_LORA_FOLDER

SUBSTRING_RULES = {
    ".img_projection_": ".img_projection.",
    ".up_proj_for_speech.": ".speech_projection.up.",
    ".up_proj_for_vision_speech.": ".vision_speech_projection.up.",
    ".down_proj_for_speech.": ".speech_projection.down.",
    ".down_proj_for_vision_speech.": ".vision_speech_projection.down.",
}
PREFIX_RULES = {"model.embed_tokens_extend.": "", "model.": "language_model.model."}
QKV = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"))
TOWER = "image_embed.img_processor."


def vllm_name(key: str) -> str:
    """`hf_to_vllm_mapper` applied to a checkpoint key."""
    for old, new in SUBSTRING_RULES.items():
        if old in key:
            key = key.replace(old, new, 1)
    for old, new in PREFIX_RULES.items():
        if key.startswith(old):
            key = key.replace(old, new, 1)
    return key


def linear(name: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), **({f"{name}.bias": (out_features,)} if bias else {})}


def norm(name: str, size: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (size,), f"{name}.bias": (size,)}


def vision_layers(config) -> int:
    """How many SigLIP layers vLLM builds: the ones up to `feature_layer` (phi4_multimodal.py)."""
    layer_idx = config.vision_config.feature_layer
    total = config.vision_config.num_hidden_layers
    return total + layer_idx + 1 if layer_idx < 0 else layer_idx + 1


def vllm_parameters(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of vLLM's Phi4MultimodalForCausalLM for `config`, from its constructors
    (the default biases of vLLM's linear layers: on, except the language model's)."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    params = {"language_model.model.embed_tokens.weight": (config.vocab_size, hidden),
              "language_model.model.norm.weight": (hidden,)}
    for i in range(config.num_hidden_layers):
        layer = f"language_model.model.layers.{i}"
        params.update({
            **linear(f"{layer}.self_attn.qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, bias=False),
            **linear(f"{layer}.self_attn.o_proj", hidden, heads * head_dim, bias=False),
            **linear(f"{layer}.mlp.gate_up_proj", 2 * config.intermediate_size, hidden, bias=False),
            **linear(f"{layer}.mlp.down_proj", hidden, config.intermediate_size, bias=False),
            f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,),
        })

    vision = config.vision_config
    width, patch = vision.hidden_size, vision.patch_size
    params.update({
        f"{TOWER}embeddings.patch_embedding.weight": (width, vision.num_channels, patch, patch),
        f"{TOWER}embeddings.patch_embedding.bias": (width,),
        f"{TOWER}embeddings.position_embedding.weight": ((vision.image_size // patch) ** 2, width),
        **linear("image_embed.img_projection.up", hidden, width),
        **linear("image_embed.img_projection.down", hidden, hidden),
        "image_embed.global_img_feature_extensor": (1, 1, width),
        "image_embed.sub_img_feature_extensor": (1, 1, 1, width),
    })
    for i in range(vision_layers(config)):
        layer = f"{TOWER}encoder.layers.{i}"
        params.update({**linear(f"{layer}.self_attn.qkv_proj", 3 * width, width),
                       **linear(f"{layer}.self_attn.out_proj", width, width),
                       **norm(f"{layer}.layer_norm1", width), **norm(f"{layer}.layer_norm2", width),
                       **linear(f"{layer}.mlp.fc1", vision.intermediate_size, width),
                       **linear(f"{layer}.mlp.fc2", width, vision.intermediate_size)})

    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as hf

    audio = config.audio_config
    width, inner = audio.hidden_size, audio.intermediate_size

    def transformers_module(name: str, module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {f"{name}.{key}": tuple(p.shape) for key, p in module.named_parameters()}

    encoder = "audio_embed.encoder"
    params.update({
        f"{encoder}.encoder_embedding.global_mean": (audio.input_size,),
        f"{encoder}.encoder_embedding.global_invstd": (audio.input_size,),
        **transformers_module(f"{encoder}.embed", hf.Phi4MultimodalAudioNemoConvSubsampling(audio)),
        **transformers_module(f"{encoder}.relative_attention_bias_layer",
                              hf.Phi4MultimodalAudioRelativeAttentionBias(audio)),
    })
    for name in ("speech_projection", "vision_speech_projection"):
        params.update({**linear(f"audio_embed.{name}.up", hidden, width * audio.downsample_rate),
                       **linear(f"audio_embed.{name}.down", hidden, hidden)})
    for i in range(audio.num_blocks):
        layer = f"{encoder}.encoders.{i}"
        params.update({**linear(f"{layer}.self_attn.qkv_proj", 3 * width, width),
                       **linear(f"{layer}.self_attn.o_proj", width, width),
                       **transformers_module(f"{layer}.conv", hf.Phi4MultimodalAudioConvModule(audio)),
                       **norm(f"{layer}.layer_norm_att", width), **norm(f"{layer}.layer_norm", width)})
        for mlp in ("feed_forward_in", "feed_forward_out"):
            params.update({**norm(f"{layer}.{mlp}.layer_norm", width),
                           **linear(f"{layer}.{mlp}.gate_up_proj", 2 * inner, width),
                           **linear(f"{layer}.{mlp}.down_proj", width, inner)})
    return params


class VllmLoadError(Exception):
    """Where vLLM's loading of these weights would stop."""


def vllm_load(shapes: dict[str, tuple[int, ...]], config) -> dict[str, tuple[int, ...]]:
    """What vLLM loads from checkpoint tensors of `shapes` (key -> shape): vLLM parameter -> the shape it gets
    (q/k/v stacked on dim 0). Raises VllmLoadError where vLLM raises: a name matching no parameter, a parameter
    left unloaded, or a shape that does not fit."""
    expected = vllm_parameters(config)
    loaded: dict[str, list[tuple[int, ...]]] = {}
    for key, shape in sorted(shapes.items()):
        name = vllm_name(key)
        if name.startswith(TOWER):
            rest = name[len(TOWER):]
            layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
            if rest.startswith(("head.", "post_layernorm.")) or (layer and int(layer[1]) >= vision_layers(config)):
                continue
        if name.startswith((TOWER, "audio_embed.")):
            for shard, _ in QKV:
                if f".{shard}." in name:
                    name = name.replace(shard, "qkv_proj")
                    break
        if name not in expected:
            raise VllmLoadError(f"{key} (as {name}): no such parameter in vLLM's Phi4MultimodalForCausalLM")
        loaded.setdefault(name, []).append(tuple(shape))
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise VllmLoadError(f"{len(missing)} weights not initialized from checkpoint, e.g. {missing[:3]}")
    got = {name: (sum(s[0] for s in parts), *parts[0][1:]) for name, parts in loaded.items()}
    wrong = [f"{name}: {got[name]} != {shape}" for name, shape in expected.items() if got[name] != shape]
    if wrong:
        raise VllmLoadError(f"{len(wrong)} shapes differ, e.g. {wrong[:3]}")
    return got


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


# ----- rotary settings as transformers 4.x and vLLM on it read them

def transformers_4_rope(config: dict) -> dict:
    """The rotary settings vLLM runs a config.json with on transformers 4.x.

    transformers 4.57.1 Phi4MultimodalConfig.__init__ takes `rope_scaling=None, rope_theta=10000.0,
    partial_rotary_factor=1` and keeps unknown keys (such as `rope_parameters`) as attributes; its
    `_rope_scaling_validation` wants exactly {type: "longrope", short_factor, long_factor}, each factor list
    rotary_ndims // 2 long. vLLM's `patch_rope_parameters` (vllm/transformers_utils/config.py, transformers < 5
    branch) then takes `rope_scaling` as `rope_parameters` when set, and writes `rope_theta`,
    `partial_rotary_factor` and `original_max_position_embeddings` into it.
    """
    scaling = config.get("rope_scaling")
    partial = config.get("partial_rotary_factor", 1)
    if scaling is not None:
        assert set(scaling) == {"type", "short_factor", "long_factor"} and scaling["type"] == "longrope", scaling
        rotary_ndims = int(config["hidden_size"] // config["num_attention_heads"] * partial)
        assert len(scaling["short_factor"]) == len(scaling["long_factor"]) == rotary_ndims // 2
    rope = dict(scaling) if scaling is not None else dict(config.get("rope_parameters") or {"rope_type": "default"})
    rope.update(rope_theta=config.get("rope_theta", 10000.0), partial_rotary_factor=partial,
                original_max_position_embeddings=config["original_max_position_embeddings"])
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


ROPE_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
             "original_max_position_embeddings")


def rope_of(rope: dict) -> dict:
    return {key: rope.get(key, rope.get("type") if key == "rope_type" else None) for key in ROPE_KEYS}


def test_config_json_as_transformers_5_writes_it_runs_with_whole_head_rotary_under_vllm_on_transformers_4(
        tiny_phi4mm):
    """Why the saved config.json is rewritten: read as transformers 4.x reads it, the file transformers 5
    writes (`rope_parameters` only) loses LongRoPE's partial rotary factor."""
    written = json.loads((tiny_phi4mm / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    ours = rope_of(load_config(tiny_phi4mm).rope_parameters)
    assert ours["partial_rotary_factor"] == 0.75
    assert transformers_4_rope(written)["partial_rotary_factor"] == 1  # vLLM on transformers 4: every head dim
    assert rope_of(transformers_4_rope(hub_form(written))) == ours


def test_hub_form_config_reads_back_the_same_in_transformers_5(tiny_phi4mm, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    shutil.copy(tiny_phi4mm / "config.json", folder / "config.json")
    write_hub_form(folder)
    written = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in written and "dtype" not in written and written["torch_dtype"] == "float32"
    assert set(written["rope_scaling"]) == {"type", "short_factor", "long_factor"}
    before, after = load_config(tiny_phi4mm), load_config(folder)
    assert rope_of(after.rope_parameters) == rope_of(before.rope_parameters)
    assert after.dtype == before.dtype
    assert hub_form(written) == written  # rewriting twice changes nothing


# ----- the weights

def test_the_reproduced_loader_rejects_what_vllm_rejects(tiny_phi4mm):
    """The checker can fail: PEFT-style keys (the remote-code layout's base_layer/lora_A), an untied lm_head,
    a state dict without the speech encoder and a wrong shape are each refused."""
    config = load_config(tiny_phi4mm)
    shapes = tensor_shapes(tiny_phi4mm)
    vllm_load(shapes, config)  # the Hub-layout base loads
    qkv = "model.layers.0.self_attn.qkv_proj"
    peft_style = {**{k: v for k, v in shapes.items() if not k.startswith(qkv)},
                  f"{qkv}.base_layer.weight": shapes[f"{qkv}.weight"], f"{qkv}.lora_A.vision.weight": (4, 64)}
    no_speech = {k: v for k, v in shapes.items() if not k.startswith(SPEECH_PREFIX)}
    wrong_shape = {**shapes, f"{qkv}.weight": (64, 64)}
    for bad, message in [(peft_style, "no such parameter"), ({**shapes, "lm_head.weight": (576, 64)}, "lm_head"),
                         (no_speech, "not initialized"), (wrong_shape, "shapes differ")]:
        with pytest.raises(VllmLoadError, match=message):
            vllm_load(bad, config)


@pytest.fixture(scope="module")
def full_run(tiny_phi4mm, shapes, tmp_path_factory) -> Path:
    """A full fine-tuning run's output (the recipe run test_phi4mm_recipes reads too)."""
    return run_once(tmp_path_factory, "hateful_memes", tiny_phi4mm, shapes) / "out"


@pytest.fixture(scope="module")
def merged_lora_run(tiny_phi4mm, shapes, tmp_path_factory) -> Path:
    """A LoRA run's adapter merged by `python -m phivision.merge_lora`."""
    from phivision import merge_lora

    adapter = run_once(tmp_path_factory, "nlvr2", tiny_phi4mm, shapes) / "out"
    return built_once(tmp_path_factory, "phi4mm-nlvr2-merged", lambda folder: merge_lora.main(
        ["--adapter", str(adapter), "--out", str(folder), "--dtype", "fp32"]))


@pytest.mark.parametrize("output", ["full_run", "merged_lora_run"])
def test_what_we_save_is_what_vllm_serves_as_is(output, request):
    """config.json names the native architecture, in the form transformers 4 reads; every tensor maps to a
    parameter of vLLM's model with its shape and every parameter gets one; no LoRA folder is left (the vision
    LoRA is merged); the processor files are transformers' Phi4MultimodalProcessor's."""
    folder = request.getfixturevalue(output)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Phi4MultimodalForCausalLM"] and config["model_type"] == "phi4_multimodal"
    assert config["tie_word_embeddings"] is True
    assert rope_of(transformers_4_rope(config)) == rope_of(load_config(folder).rope_parameters)
    assert not (folder / VISION_LORA_FOLDER).exists() and not (folder / "speech-lora").exists()

    loaded = vllm_load(tensor_shapes(folder), load_config(folder))
    assert "language_model.model.layers.0.self_attn.qkv_proj.weight" in loaded
    assert f"{TOWER}encoder.layers.0.self_attn.qkv_proj.weight" in loaded

    # vLLM processes prompts with transformers' Phi4MultimodalProcessor, which reads the tokenizer's image_token
    # and audio_token (processing_phi4_multimodal.py, __init__).
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Phi4MultimodalProcessor"
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer["image_token"] == "<|endoftext10|>" and tokenizer["audio_token"] == "<|endoftext11|>"
