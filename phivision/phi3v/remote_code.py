"""The `auto_map` entries our saved files carry: where the original Phi-3(.5)-vision code lives on the Hub.

Readers without this package (vLLM, transformers 4.x with `trust_remote_code=True`) find the classes of a
"phi3_v" checkpoint through `auto_map`. The Hub's files name modules that sit beside them
(`"configuration_phi3_v.Phi3VConfig"`), which a folder we write does not hold; so every entry we write also
names the Hub repo (`"microsoft/Phi-3.5-vision-instruct--configuration_phi3_v.Phi3VConfig"`), a form that
transformers' dynamic-module loader resolves by fetching that module from the Hub. With `import phivision`, the
Auto classes load our own classes and never read these entries.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_REPO = "microsoft/Phi-3.5-vision-instruct"
# Released repos whose code our files may name; a local copy named after one of them (its folder, or the
# `_name_or_path` its config.json records) is taken to be a copy of it.
KNOWN_REPOS = (DEFAULT_REPO, "microsoft/Phi-3-vision-128k-instruct")

# What microsoft/Phi-3.5-vision-instruct's own files name (config.json, preprocessor_config.json,
# processor_config.json and tokenizer_config.json).
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor", **PROCESSOR_AUTO_MAP}

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CACHE_SNAPSHOT = re.compile(r"models--([\w.-]+?)--([\w.-]+)")


def code_repo(name_or_path: str | Path | None) -> str:
    """The Hub repo whose code a checkpoint loaded from `name_or_path` runs on.

    A Hub id is its own repo; a snapshot in the Hugging Face cache (`.../models--ORG--NAME/snapshots/...`)
    is one of ORG/NAME; a local folder named after a released repo (`Phi-3-vision-128k-instruct`, or the
    `_name_or_path` the Hub writes into config.json) is one of it; anything else is taken to be
    microsoft/Phi-3.5-vision-instruct.
    """
    text = str(name_or_path or "")
    snapshot = _CACHE_SNAPSHOT.search(text)
    if snapshot:
        return f"{snapshot[1]}/{snapshot[2]}"
    if _HUB_ID.fullmatch(text) and not Path(text).exists():
        return text
    name = Path(text).name
    return next((repo for repo in KNOWN_REPOS if repo.split("/")[1] == name), DEFAULT_REPO)


def with_repo(auto_map: dict[str, str] | None, defaults: dict[str, str], repo: str,
              replace: bool = False) -> dict[str, str]:
    """`auto_map` (or `defaults` when it has none) with every entry naming its Hub repo.

    Entries that name one already keep it unless `replace`; `repo` goes on the others.
    """
    entries = {**defaults, **(auto_map or {})}
    out = {}
    for key, reference in entries.items():
        if not isinstance(reference, str):  # [slow, fast] pairs of AutoTokenizer: not ours to write
            out[key] = reference
            continue
        named, _, module_class = reference.rpartition("--")
        out[key] = reference if named and not replace else f"{repo}--{module_class}"
    return out


def set_code_repo(repo: str, config, image_processor) -> None:
    """Makes a model config and an image processor (whose auto_map the processor files repeat) name `repo`
    when saved, instead of the repo they were loaded from."""
    config.auto_map = with_repo(getattr(config, "auto_map", None), MODEL_AUTO_MAP, repo, replace=True)
    image_processor.auto_map = with_repo(image_processor.auto_map, IMAGE_PROCESSOR_AUTO_MAP, repo, replace=True)
