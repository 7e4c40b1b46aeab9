"""phivision.phi3v.remote_code: auto_map entries that name the Hub repo of the original code; our classes still load natively."""

import json

import torch
from helpers import check_loads_elsewhere
from PIL import Image

from phivision import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from phivision.phi3v.remote_code import MODEL_AUTO_MAP, code_repo, with_repo


def test_code_repo_of_hub_ids_cache_snapshots_and_local_copies(tmp_path):
    assert code_repo("microsoft/Phi-3-vision-128k-instruct") == "microsoft/Phi-3-vision-128k-instruct"
    snapshot = "/home/me/.cache/huggingface/hub/models--microsoft--Phi-3-vision-128k-instruct/snapshots/abc123"
    assert code_repo(snapshot) == "microsoft/Phi-3-vision-128k-instruct"
    assert code_repo("/models/Phi-3-vision-128k-instruct") == "microsoft/Phi-3-vision-128k-instruct"
    assert code_repo("Phi-3.5-vision-instruct") == "microsoft/Phi-3.5-vision-instruct"  # the Hub's _name_or_path
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    local = tmp_path / "org" / "model"
    assert code_repo(local) == "microsoft/Phi-3.5-vision-instruct"  # a folder, not a Hub id: the default
    for nothing in (None, ""):
        assert code_repo(nothing) == "microsoft/Phi-3.5-vision-instruct"


def test_with_repo_names_the_repo_once():
    hub = {"AutoConfig": "configuration_phi3_v.Phi3VConfig"}
    named = with_repo(hub, MODEL_AUTO_MAP, "org/model")
    assert named == {"AutoConfig": "org/model--configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "org/model--modeling_phi3_v.Phi3VForCausalLM"}
    assert with_repo(named, MODEL_AUTO_MAP, "other/repo") == named  # kept: it names where it came from
    assert with_repo(named, MODEL_AUTO_MAP, "other/repo", replace=True)["AutoConfig"] == \
        "other/repo--configuration_phi3_v.Phi3VConfig"
    assert with_repo(None, {}, "org/model") == {}


def test_a_checkpoint_loaded_from_the_hub_keeps_its_repo(tiny, tmp_path):
    """Loaded from a Hub cache snapshot of another repo, the saved files name that repo, not the default."""
    snapshot = tmp_path / "models--microsoft--Phi-3-vision-128k-instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for path in tiny.iterdir():
        config = json.loads(path.read_text()) if path.suffix == ".json" else None
        if config is not None and "auto_map" in config:  # as on the Hub: the modules beside the files
            config["auto_map"] = {k: v.split("--")[1] for k, v in config["auto_map"].items()}
            (snapshot / path.name).write_text(json.dumps(config))
        else:
            (snapshot / path.name).write_bytes(path.read_bytes())
    Phi3VForCausalLM.from_pretrained(snapshot).save_pretrained(tmp_path / "out")
    Phi3VProcessor.from_pretrained(snapshot).save_pretrained(tmp_path / "out")
    check_loads_elsewhere(tmp_path / "out", repo="microsoft/Phi-3-vision-128k-instruct")


def test_auto_classes_still_load_ours_with_identical_logits(tiny):
    """With `import phivision`, the Auto classes pick our classes, also when asked to trust remote code (which,
    offline, would fail if they went to the Hub)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

    check_loads_elsewhere(tiny)
    processor = Phi3VProcessor.from_pretrained(tiny)
    inputs = processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n", [Image.new("RGB", (60, 40), "red")])
    with torch.no_grad():
        reference = Phi3VForCausalLM.from_pretrained(tiny).eval()(**inputs).logits
    for kwargs in ({}, {"trust_remote_code": True}):
        assert isinstance(AutoConfig.from_pretrained(tiny, **kwargs), Phi3VConfig)
        model = AutoModelForCausalLM.from_pretrained(tiny, **kwargs).eval()
        assert isinstance(model, Phi3VForCausalLM)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
        loaded = AutoProcessor.from_pretrained(tiny, num_crops=2, **kwargs)
        assert isinstance(loaded, Phi3VProcessor) and loaded.image_processor.num_crops == 2
        assert isinstance(AutoImageProcessor.from_pretrained(tiny, **kwargs), Phi3VImageProcessor)
