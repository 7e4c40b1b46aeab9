"""phi3v.attention: which kernel a training run uses."""

from phi3v import attention


def test_training_attention_packs_per_sample_without_flash_attn(monkeypatch, caplog):
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert attention.training_attention(True, packing=True) == "flash_attention_2"
    assert attention.training_attention(False, packing=True) == "sdpa_packed"
    assert attention.training_attention(False, packing=False) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert attention.training_attention(True, packing=True) == "sdpa_packed"  # not SDPA over the whole packed row
    assert attention.training_attention(True, packing=False) == "sdpa"
