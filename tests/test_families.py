"""phivision.families: a checkpoint's family is read from its config.json, before anything loads."""

import json
from pathlib import Path

import pytest

from phivision.errors import SetupError
from phivision.families import family_of, family_of_model
from phivision.phi3v.family import Phi3VFamily
from phivision.training.modes import load_processor


def test_a_phi3v_checkpoint_and_its_model_belong_to_the_phi3v_family(tiny):
    family = family_of(str(tiny))
    assert isinstance(family, Phi3VFamily)
    model = family.model_class().from_pretrained(tiny)
    assert family_of_model(model) is family
    assert type(family.load_processor(str(tiny))).__name__ == "Phi3VProcessor"


def test_a_model_of_another_kind_is_refused_in_one_line_naming_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SetupError, match=r"^--model_name_or_path .*: model_type 'llama' is not a model these recipes "
                                         r"fine-tune \(Phi-3.5-vision \(phi3_v\)"):
        load_processor(str(tmp_path))
    with pytest.raises(SetupError, match=r"^--base .*: model_type 'llama'"):
        family_of(str(tmp_path), "--base")


def test_a_folder_without_a_config_is_named_with_its_flag(tmp_path):
    with pytest.raises(SetupError, match=r"^--model .*: no config.json in it \(is it a model folder\?\)$"):
        family_of(str(tmp_path), "--model")


def test_phi4mm_in_its_remote_code_layout_is_told_to_use_the_native_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi4mm"}))
    with pytest.raises(SetupError, match=r"remote-code layout; use a snapshot in the transformers-native layout"):
        family_of(str(tmp_path))


def test_a_phi4mm_checkpoint_belongs_to_the_phi4mm_family(tmp_path):
    from phivision.phi4mm.family import Phi4MMFamily
    from phivision.phi4mm.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "tiny4", 1)
    family = family_of(str(path))
    assert isinstance(family, Phi4MMFamily)
    model = family.model_class().from_pretrained(path)
    assert family_of_model(model) is family and type(model).__name__ == "Phi4MultimodalForCausalLM"
    assert type(family.load_processor(str(path))).__name__ == "Phi4MMProcessor"


def test_a_saved_full_phi4mm_loads_back_into_the_model_held_for_training(tmp_path):
    """A run that stopped after its last step finishes from its checkpoint: a full model saved with the speech
    encoder put back loads into a model that training left without it (torch skips the keys of a module that is
    None, so no key is unexpected)."""
    import torch
    from safetensors.torch import save_file

    from phivision.phi4mm.tiny import build_tiny_checkpoint
    from phivision.training.checkpoints import load_model_weights

    base = build_tiny_checkpoint(tmp_path / "tiny4", 1)
    family = family_of(str(base))
    trained = family.model_class().from_pretrained(base)
    family.prepare_for_training(trained)
    with torch.no_grad():
        trained.lm_head.weight.add_(1.0)  # tied: the embeddings change too
    saved = family.state_dict_to_save(trained.state_dict(), str(base))
    assert any(".audio_embed." in name for name in saved)
    (tmp_path / "checkpoint-2").mkdir()
    save_file({k: v.contiguous() for k, v in saved.items() if k != "lm_head.weight"},
              tmp_path / "checkpoint-2" / "model.safetensors")
    model = family.model_class().from_pretrained(base)
    family.prepare_for_training(model)
    load_model_weights(model, tmp_path / "checkpoint-2")
    assert torch.equal(model.lm_head.weight, trained.lm_head.weight)


def test_phi4mm_with_partitioned_weights_is_refused_in_one_line_before_the_model_loads(tiny_phi4mm, shapes, tmp_path):
    """FSDP2 and ZeRO-3: the shipped vision LoRA is merged as the weights load, and a text-only evaluation rank would
    run other collectives than an image rank (a gloo size mismatch under FSDP2 when it was allowed)."""
    from types import SimpleNamespace

    from forked import ROOT, forked_run

    from phivision.training import modes
    from phivision.training.arguments import FlagError

    # The recipe as `python finetune_hf_trainer_hateful_memes.py ...` runs it (one process forked from one that has
    # imported the libraries: tests/forked.py).
    result = forked_run(ROOT / "finetune_hf_trainer_hateful_memes.py", [
        "--model_name_or_path", tiny_phi4mm, "--dataset_name_or_path", shapes, "--output_dir", tmp_path / "out",
        "--fsdp", "--fsdp_config", "fsdp_config.json"], nproc=None, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --fsdp: Phi-4-multimodal cannot train with partitioned weights (ZeRO-3, FSDP2) yet; use ZeRO-2 "
        "(--deepspeed ds_config_zero2.json, the default) or LoRA")
    assert "Loading weights" not in result.stdout + result.stderr
    # ZeRO-3 (which needs torchrun even for one process): the same check, with DeepSpeed's global switch on.
    args = SimpleNamespace(model=SimpleNamespace(model_name_or_path=str(tiny_phi4mm), cache_vision_features=False,
                                                 remote_code_repo=None),
                           lora=SimpleNamespace(continue_vision_lora=False),
                           training=SimpleNamespace(fsdp=[], deepspeed="ds_config_zero3.json"))
    modes.check_family_flags(args)  # ZeRO-2 (the switch off): allowed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modes, "is_deepspeed_zero3_enabled", lambda: True)
        with pytest.raises(FlagError, match=r"^--deepspeed ds_config_zero3.json: Phi-4-multimodal cannot train with "
                                            r"partitioned weights"):
            modes.check_family_flags(args)
