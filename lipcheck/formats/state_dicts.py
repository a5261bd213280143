"""Where a torch checkpoint keeps its weights: a state_dict, one under a common key
(``state_dict``, ``model``, ``ema``, ...), a pickled module beside them, or tensors nested in
dicts and lists; DataParallel/torch.compile name prefixes removed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Keys under which checkpoints commonly keep their weights, most specific first.
STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network",
              "module", "weights", "params", "ema", "model_ema")


class ScriptObject:
    """An instance of a TorchScript class, reduced to the state the archive stores."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> ScriptObject:
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def find_module(obj: Mapping[Any, Any]) -> torch.nn.Module | None:
    for key in STATE_KEYS:
        if isinstance(obj.get(key), torch.nn.Module):
            return obj[key]
    return None


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def find_state_dict(obj: Mapping[Any, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    if is_tensor_dict(obj):
        return "", _strip_prefix({str(k): v for k, v in obj.items()})
    for key in STATE_KEYS:
        if is_tensor_dict(obj.get(key)):
            return key, _strip_prefix({str(k): v for k, v in obj[key].items()})
    # Otherwise: every tensor in the dict (and in its lists), nested keys joined with '.'.
    flat: dict[str, torch.Tensor] = {}
    walk_tensors("", obj, flat, set())
    return "", _strip_prefix(flat)


def walk_tensors(prefix: str, value: Any, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix or "tensor"] = value
        return
    if id(value) in seen:  # shared or cyclic references in a pickle
        return
    if isinstance(value, Mapping):
        seen.add(id(value))
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        items = list(enumerate(value))
    elif isinstance(value, ScriptObject):
        seen.add(id(value))
        state = value.state
        items = list(state.items()) if isinstance(state, Mapping) else list(enumerate(
            state if isinstance(state, (list, tuple)) else [state]))
        # A module's own tensors come before its submodules', as in state_dict().
        items.sort(key=lambda kv: not isinstance(kv[1], torch.Tensor))
    else:
        return
    for k, v in items:
        walk_tensors(f"{prefix}.{k}" if prefix else str(k), v, out, seen)


def stripped_names(keys: list[str]) -> dict[str, str]:
    """Original key -> the name lipcheck reports. DataParallel / DistributedDataParallel
    (and torch.compile) save every key under one prefix; it is removed only when all keys
    carry it, so a mixed dict keeps its names."""
    names = {k: k for k in keys}
    for prefix in ("module.", "_orig_mod."):
        if names and all(v.startswith(prefix) for v in names.values()):
            names = {k: v[len(prefix):] for k, v in names.items()}
    return names


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = stripped_names(list(tensors))
    return {names[k]: v for k, v in tensors.items()}
