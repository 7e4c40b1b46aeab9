"""--cache_vision_features: a frozen tower's image features, computed once per training sample and reused.

With the vision tower and projector frozen, a sample's projected image features cannot change between
epochs as long as its pixels don't. A pre-pass computes them, in the precision training computes in,
and writes one file per training row under output_dir/vision_features; training batches then carry
`image_features` instead of pixel values and the model skips the tower (Phi3VModel.embed). Training is
bit-identical to the uncached run wherever the tower's output for an image does not depend on the other
images in its batch (true of the CPU kernels; GPU matmul kernels chosen by batch size may differ in the
last bit).

The files are kept for a resumed run (only missing ones are computed) and rebuilt when the vision
weights, num_crops, the precision or torch change; the operating system keeps in memory what fits. Each
file holds a fingerprint of its sample's pixels: a sample whose pixels differ later (augmented images,
changed data) stops the run instead of training on stale features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.rows import UNREADABLE
from ..distributed import is_main_process, main_process_decides, rank_and_world_size
from ..errors import SetupError
from ..files import follow_umask
from ..phi3v.modeling import Phi3VImageEmbedding
from .sharding import full_weights

KEY_FILE = "key.json"


def pixel_fingerprint(sample: dict[str, Any]) -> str:
    """A digest of a sample's pixel values and image sizes (what its features are computed from)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("pixel_values", "image_sizes"):
        digest.update(sample[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of a module's weights (and their dtypes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def image_embedding(model: torch.nn.Module) -> Phi3VImageEmbedding:
    """The image embedding of a Phi3VForCausalLM, adapters (peft) or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_embed_tokens


class VisionFeatureCache:
    """Projected image features of training rows, one safetensors file per row index in `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, index: int) -> Path:
        return self.directory / f"{index}.safetensors"

    def attach(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        """`sample` (the collator's encoding of row `index`) with its cached `image_features` in place of pixels.

        A text-only sample gets empty features: with them the model runs no vision tower, where a text-only
        batch would run it on a blank crop under ZeRO-3/FSDP (a collective that ranks with cached features in
        their batches never join).
        """
        if sample.get("pixel_values") is None:
            return {**sample, "image_features": torch.zeros(0)}  # torch.cat skips it beside other features
        path = self.path(index)
        if not path.is_file():
            raise SetupError(f"--cache_vision_features: no features for training row {index} in {self.directory} "
                             "(the data changed since the pre-pass?): delete that folder and run again")
        with safe_open(path, "pt") as cached:
            if cached.metadata()["pixels"] != pixel_fingerprint(sample):
                raise SetupError(f"--cache_vision_features: the pixels of training row {index} differ from the ones "
                                 "its features were computed from (augmented images, or changed data): cached "
                                 "features would be stale; run without the flag")
            features = cached.get_tensor("features")
        return {**sample, "pixel_values": None, "image_sizes": None, "image_features": features}

    def fill(self, model: torch.nn.Module, rows: Sequence[Any], indices: Sequence[int],
             encode: Callable[[Any], dict[str, Any]], num_crops: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             device: torch.device | None = None, num_workers: int = 0, disable_tqdm: bool = False) -> int:
        """The pre-pass: computes the features of the rows at `indices` that have none yet; returns for how many rows
        (with images) it did.

        Run the way training runs the tower (same `autocast`, train mode, no gradient), so the features are
        the ones the uncached run computes, on `device` (where training runs; the model may not be there yet
        under DeepSpeed). Under torchrun the rows are shared out between processes.
        """
        embedding = image_embedding(model)
        vision_config = embedding.img_processor.vision_model.config
        if vision_config.attention_dropout:
            raise SetupError(f"--cache_vision_features: the vision tower's attention dropout is "
                             f"{vision_config.attention_dropout}: its features change at every step")
        # Under ZeRO-3 the pre-pass runs before the DeepSpeed engine exists, which would gather each weight in
        # forward passes: each rank holds empty slices until they are gathered here, for the fingerprint too.
        with full_weights(embedding):
            if device is not None and next(embedding.parameters()).device != device:
                embedding.to(device)
            device = next(embedding.parameters()).device
            with autocast():
                precision = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            key = {"vision_weights": weights_fingerprint(embedding), "num_crops": num_crops,
                   "weights_dtype": str(next(embedding.parameters()).dtype), "autocast": str(precision),
                   "torch": torch.__version__}
            main_process_decides(lambda: self.start(key))
            rank, world_size = rank_and_world_size()
            missing = [index for index in indices if not self.path(index).is_file()]
            computed = self.compute(embedding, rows, missing[rank::world_size], encode, autocast, num_workers,
                                    disable_tqdm or not is_main_process())
            if dist.is_initialized():
                dist.barrier()
            # Processes on other machines may not see these files (an output_dir on local disks): each computes
            # what it still misses.
            missing = [index for index in indices if not self.path(index).is_file()]
            return computed + self.compute(embedding, rows, missing, encode, autocast, num_workers, True)

    def start(self, key: dict[str, Any]) -> None:
        """Empties the folder when its features were computed with another key (weights, num_crops, precision)."""
        key_file = self.directory / KEY_FILE
        if key_file.is_file() and json.loads(key_file.read_text()) == key:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        key_file.write_text(json.dumps(key, indent=1))

    def compute(self, embedding: Phi3VImageEmbedding, rows: Sequence[Any], indices: list[int],
                encode: Callable[[Any], dict[str, Any]], autocast: Callable[[], contextlib.AbstractContextManager],
                num_workers: int, disable_tqdm: bool) -> int:
        """Computes and writes the features of the rows at `indices` (unreadable rows are skipped); returns for how
        many rows with images."""
        if not indices:
            return 0
        samples = torch.utils.data.DataLoader(
            EncodedRows(rows, indices, encode), batch_size=None, num_workers=num_workers,
            generator=torch.Generator(),  # not the global RNG: training's sample order must not change
        )
        device = next(embedding.parameters()).device
        was_training = embedding.training
        embedding.train()  # as in training (dropout is 0: train and eval mode give the same features)
        computed = 0
        try:
            for index, sample in tqdm(samples, desc="Caching image features", disable=disable_tqdm):
                if sample is None:
                    continue  # unreadable: training replaces it (TrainingSamples)
                if sample.get("pixel_values") is None:  # text only: nothing to compute, but done
                    self.store(index, torch.zeros(0), "no images")
                    continue
                with torch.no_grad(), autocast():
                    features = embedding(sample["pixel_values"].to(device), sample["image_sizes"].to(device))
                self.store(index, features.cpu(), pixel_fingerprint(sample))
                computed += 1
        finally:
            embedding.train(was_training)
        return computed

    def store(self, index: int, features: torch.Tensor, fingerprint: str) -> None:
        """Writes one row's features; a file is complete or absent (written aside, then renamed)."""
        partial = self.path(index).with_suffix(f".{os.getpid()}.partial")
        save_file({"features": features.contiguous()}, partial, metadata={"pixels": fingerprint})
        follow_umask(partial)  # safetensors writes 0600
        os.replace(partial, self.path(index))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class EncodedRows(torch.utils.data.Dataset):
    """(index, encoded row) for the pre-pass, or (index, None) for a row that cannot be read."""

    def __init__(self, rows: Sequence[Any], indices: list[int], encode: Callable[[Any], dict[str, Any]]):
        self.rows, self.indices, self.encode = rows, indices, encode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Any] | None]:
        index = self.indices[i]
        try:
            return index, self.encode(self.rows[index])
        except UNREADABLE:
            return index, None  # skipped: training replaces it too (TrainingSamples)
