"""Reading the weight files of a released model folder: shards, indexes, shapes, selected keys.

Hugging Face ``save_pretrained`` layouts (one file or sharded with an index; safetensors or ``.bin``). ``.bin``
files are read with ``torch.load(weights_only=True)``, memory-mapped where possible, so reading a 7B
folder's shapes does not load its tensors. Every failure is a one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A released checkpoint that does not have the expected layout; the message is one line naming the key."""


def read_llava_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a LLaVA-layout folder as a dict (never through ``AutoConfig``: LLaVA-1.5's
    ``model_type: llava`` would be read as transformers' own, differently shaped, ``LlavaConfig``)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a LLaVA checkpoint folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def require_field(config: Mapping[str, Any], key: str, folder: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{folder}/config.json: missing field {key!r}")
    return config[key]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder, in the layouts ``save_pretrained`` has used."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a weight index (no 'weight_map')") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index}: lists shard {file.name}, which does not exist")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"{folder}: no weights (expected model.safetensors, pytorch_model.bin or a sharded index)"
    )


def load_weight_file(path: Path) -> dict[str, Tensor]:
    """All tensors of one weight file; ``.bin`` is memory-mapped, so reading only shapes stays cheap."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def weight_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Key -> (shape, file) over every weight file of the folder, without reading safetensors data."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), file)
        else:
            for key, value in load_weight_file(file).items():
                shapes[key] = (tuple(value.shape), file)
    return shapes


def read_weights(folder: Path, keys: Sequence[str]) -> dict[str, Tensor]:
    """The tensors of ``keys`` (all present: checked by the caller) from a folder's weight files."""
    wanted, found = set(keys), {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in wanted & set(handle.keys()):
                    found[key] = handle.get_tensor(key)
        else:
            state = load_weight_file(file)
            for key in wanted & state.keys():
                found[key] = state[key].clone()
    return found
