"""phivision.phi3v.configuration: `torch_dtype`, the key our config.json keeps the dtype under, reads and writes silently."""

import json

import torch
import transformers.configuration_utils

from phivision import Phi3VConfig
from phivision.tiny import tiny_config


def test_config_round_trip_says_nothing_about_torch_dtype(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(transformers.configuration_utils.logger, "warning_once", lambda *args, **kwargs: said.append(args))
    config = tiny_config()
    config.torch_dtype = torch.bfloat16
    assert config.dtype == torch.bfloat16
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"  # the Hub's key
    loaded = Phi3VConfig.from_pretrained(tmp_path)
    repr(loaded)  # what logs and the Trainer print
    assert loaded.dtype == loaded.torch_dtype == torch.bfloat16
    assert not said
