"""phivision.attention: which kernel a training run uses."""

from phivision import attention


def test_training_attention_packs_per_sample_without_flash_attn(monkeypatch, caplog):
    monkeypatch.setattr(attention, "flash_attn_unusable", lambda: None)
    assert attention.training_attention(True, packing=True) == "flash_attention_2"
    assert attention.training_attention(False, packing=True) == "sdpa_packed"
    assert attention.training_attention(False, packing=False) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_unusable", lambda: "flash-attn is not installed")
    assert attention.training_attention(True, packing=True) == "sdpa_packed"  # not SDPA over the whole packed row
    assert attention.training_attention(True, packing=False) == "sdpa"


def test_flash_attention_only_where_it_can_run(monkeypatch, caplog):
    import sys
    import types

    import torch

    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100
    assert "older than Ampere" in attention.flash_attn_unusable()
    assert attention.training_attention(True, packing=False) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    working = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # a wheel built for another torch: the import fails
    assert "does not load" in attention.flash_attn_unusable()
    monkeypatch.setitem(sys.modules, "flash_attn", working)
    assert attention.flash_attn_unusable() is None
    assert attention.training_attention(True, packing=True) == "flash_attention_2"
