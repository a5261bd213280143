"""Model folders as Hugging Face writes them: ``config.json`` beside ``model.safetensors``,
or shards ``model-0000k-of-0000N.safetensors`` listed by ``model.safetensors.index.json``
(likewise ``pytorch_model*.bin`` with ``pytorch_model.bin.index.json``).

The tensors are read one at a time, when the analysis asks for them: a safetensors shard's
header is validated when the folder is opened and each tensor is read from its offsets;
``.bin`` shards are opened with ``torch.load(weights_only=True, mmap=True)``. Every shard
must be a regular file inside the folder (a relative name, no ``..``, no symlink), every
indexed tensor must be in the shard the index names, and no tensor may appear twice.
"""

from __future__ import annotations

import json
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import InputError
from ..names import natural_key
from . import Kind, Loaded
from .safetensors_format import no_duplicate_keys

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def is_checkpoint_path(path: Path) -> bool:
    """A folder, or an index file: what this module opens."""
    return path.is_dir() or path.name.endswith(".index.json")


class ShardedTensors(Mapping[str, torch.Tensor]):
    """The tensors of every shard as one mapping, in natural name order (``layers.2``
    before ``layers.10``), each read from its shard when asked for."""

    def __init__(self, shards: dict[str, Mapping[str, torch.Tensor]]) -> None:
        self.where: dict[str, Mapping[str, torch.Tensor]] = {}
        for shard_tensors in shards.values():
            for name in shard_tensors:
                self.where[name] = shard_tensors
        self.order = sorted(self.where, key=natural_key)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.where[name][name]

    def read_float64(self, name: str) -> torch.Tensor | None:
        """The tensor widened to float64 by its shard (chunk by chunk), where the shard can."""
        return read_float64(self.where[name], name)

    def header(self, name: str) -> torch.Tensor:
        """The tensor's shape and dtype from its shard's header (safetensors) or its mapped storage."""
        return header_of(self.where[name], name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __contains__(self, name: object) -> bool:
        return name in self.where  # Mapping's default would read the tensor

    def __len__(self) -> int:
        return len(self.order)


def header_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A tensor with the stored shape and dtype: a meta tensor from the file's header where the
    mapping reads lazily (nothing read), else the tensor itself."""
    header = getattr(tensors, "header", None)
    return header(key) if callable(header) else tensors[key]


def shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, from the file's header where the mapping reads lazily (nothing read)."""
    return tuple(header_of(tensors, key).shape)


def read_float64(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The tensor widened to float64 from its file a chunk at a time, where the mapping can
    (safetensors); None where it cannot (read it as stored, then widen)."""
    read = getattr(tensors, "read_float64", None)
    return read(key) if callable(read) else None


class _Listed(Mapping[str, torch.Tensor]):
    """The tensors of a shard that its index lists (read when asked for, like the shard's)."""

    def __init__(self, shard: Mapping[str, torch.Tensor], names: list[str]) -> None:
        self.shard, self.names = shard, list(names)
        self.known = set(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.known:
            raise KeyError(name)
        return self.shard[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.known

    def read_float64(self, name: str) -> torch.Tensor | None:
        return read_float64(self.shard, name) if name in self.known else None

    def header(self, name: str) -> torch.Tensor:
        return header_of(self.shard, name)


def _inside(folder: Path, name: Any, where: str) -> Path:
    """``folder / name`` for a shard name that stays inside the folder, else an error."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{where}: shard name {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts or name.startswith("\\"):
        raise InputError(f"{where}: shard '{name}' is outside the model folder: refused")
    candidate = folder
    for part in pure.parts:
        candidate = candidate / part
        if candidate.is_symlink():
            raise InputError(f"{where}: shard '{name}' goes through the symlink '{candidate}': refused")
    try:
        mode = candidate.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{where}: shard '{name}' is not in {folder}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{where}: shard '{name}' is not a regular file")
    return candidate


def _open_shard(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from .safetensors_format import SafetensorsFile

        return SafetensorsFile(path)
    from .torch_pickle import check_zip_sizes

    check_zip_sizes(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; the shard is at fault
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable torch.save shard ({first})") from None
    if not (isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise InputError(f"{path}: a shard must hold a dict of tensors")
    return {str(k): v for k, v in obj.items()}


def read_index(index: Path) -> dict[str, str]:
    try:
        doc = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=no_duplicate_keys)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{index} is not a readable index: {exc}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: no 'weight_map' of tensor names to shard files")
    return weight_map


def load_checkpoint_folder(path: Path) -> Loaded:
    folder = path if path.is_dir() else path.parent
    notes: list[str] = []
    index = path if not path.is_dir() else next(
        (folder / n for n in INDEX_NAMES if (folder / n).is_file()), None)
    if index is not None:
        weight_map = read_index(index)
        single = [n for n in SINGLE_NAMES if (folder / n).is_file()]
        if single and path.is_dir():
            notes.append(f"the folder holds both {single[0]} and {index.name}: the index is used")
        by_shard: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(tensor)
        shards: dict[str, Mapping[str, torch.Tensor]] = {}
        for shard, listed in by_shard.items():
            opened = _open_shard(_inside(folder, shard, str(index)))
            missing = [t for t in listed if t not in opened]
            if missing:
                raise InputError(f"{index}: tensor '{missing[0]}' is not in its shard '{shard}'")
            unlisted = [t for t in opened if weight_map.get(t) != shard]
            if unlisted:
                notes.append(f"{shard}: {len(unlisted)} tensors the index does not list are ignored")
            shards[shard] = _Listed(opened, listed) if unlisted else opened
        source = f"{len(shards)} shards listed by {index.name}"
    else:
        name = next((n for n in SINGLE_NAMES if (folder / n).is_file()), None)
        if name is None:
            raise InputError(f"{folder} is a directory but not a model folder: expected {' or '.join(INDEX_NAMES)}, "
                             f"or {' or '.join(SINGLE_NAMES)}")
        shards = {name: _open_shard(_inside(folder, name, str(folder)))}
        source = name
    seen: dict[str, str] = {}
    for shard, tensors in shards.items():
        for t in tensors:
            if t in seen:
                raise InputError(f"{folder}: tensor '{t}' is in both {seen[t]} and {shard}")
            seen[t] = shard
    config = _config(folder)
    if config:
        notes.append(config)
    notes.append(f"weights read from {source}, one tensor at a time")
    loaded = Loaded(format=Kind.CHECKPOINT_FOLDER, tensors=ShardedTensors(shards), notes=notes,
                    config=read_config(folder))
    loaded.why_no_graph = ("a checkpoint folder has weights but no graph: every matrix is reported, "
                           "and no network bound is composed")
    return loaded


def read_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json as a dict, or None (missing or not a JSON object)."""
    try:
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _config(folder: Path) -> str:
    """A one-line summary of config.json (model type and size), or ''."""
    doc = read_config(folder)
    if doc is None:
        return ""
    parts = [f"{k} {doc[k]}" for k in ("model_type", "num_hidden_layers", "hidden_size",
                                          "num_attention_heads", "num_local_experts", "num_experts")
             if isinstance(doc.get(k), (str, int))]
    return "config.json: " + ", ".join(parts) if parts else ""
