"""A saved Phi-4-multimodal's config.json, in the form transformers 4 and 5 (and so vLLM on either) read alike.

transformers 5 writes the rotary settings as one `rope_parameters` dict. transformers 4.x's Phi4MultimodalConfig
knows only the top-level `rope_scaling`, `rope_theta` and `partial_rotary_factor` (defaults: None, 10000.0, 1):
it reads a `rope_parameters`-only file as a model without LongRoPE whose rotary embedding covers whole heads,
and vLLM on transformers 4 (vllm/transformers_utils/config.py, patch_rope_parameters) then writes that
partial_rotary_factor of 1 into the dict: a model that loads and answers wrongly. The Hub's checkpoint keeps the
4.x keys (`rope_scaling` {"type": "longrope", "short_factor", "long_factor"}), which transformers 5 reads too:
its Phi4MultimodalConfig takes `rope_scaling` over `rope_parameters`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"


def hub_form(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a config.json as transformers 5 writes it) with the rotary settings and the dtype under the keys
    transformers 4.x reads. A config already in that form is returned as it is."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if rope is None:
        return out
    out["rope_theta"] = rope.get("rope_theta", 10000.0)
    out["partial_rotary_factor"] = rope.get("partial_rotary_factor", 1.0)
    # transformers 4.x accepts exactly these three keys, of type "longrope" (its _rope_scaling_validation).
    longrope = rope.get("rope_type", rope.get("type")) == "longrope"
    out["rope_scaling"] = ({"type": "longrope", "short_factor": list(rope["short_factor"]),
                            "long_factor": list(rope["long_factor"])} if longrope else None)
    if "dtype" in out:  # transformers < 4.56 reads only torch_dtype
        out["torch_dtype"] = out.pop("dtype")
    return out


def write_hub_form(folder: str | Path) -> None:
    """Rewrites `folder`/config.json (a full model just saved) in `hub_form`."""
    path = Path(folder) / CONFIG_FILE
    config = json.loads(path.read_text())
    path.write_text(json.dumps(hub_form(config), indent=2, sort_keys=True) + "\n")
