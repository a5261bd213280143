"""Writing torch files back with rescaled weights (normalize's torch writer): TorchScript
archives, pickled modules, checkpoint dicts and state_dicts, each in its own structure."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from ..files import atomic_write
from ..rewrite import Rewrite
from . import Kind
from .state_dicts import STATE_KEYS, find_module, is_tensor_dict, stripped_names
from .torch_pickle import torch_load
from .torchscript import jit_load


def save_scaled(kind: Kind, source: Path, output: Path, rewrite: Rewrite, trust: bool) -> None:
    """Read ``source`` again as what it is, apply ``rewrite``, write ``output`` atomically.
    Every other entry of a checkpoint (optimizer state, epoch, config) is kept as it was."""
    if kind is Kind.TORCHSCRIPT:
        if not trust:
            raise UntrustedInputError(
                f"{source} is a TorchScript archive: writing it back needs torch.jit.load, which runs "
                "code stored in it; if you trust it, pass --trust")
        script = jit_load(source)
        scale_module(script, rewrite)
        _atomic(output, lambda buf: torch.jit.save(script, buf))
        return
    obj = torch_load(source, trust)
    if isinstance(obj, torch.nn.Module):
        scale_module(obj, rewrite)
    elif kind is Kind.CHECKPOINT_MODULE:
        module = find_module(obj)
        assert module is not None  # the loader found it there
        scale_module(module, rewrite)
    else:
        obj = _rewrite_checkpoint(obj, rewrite)
    _atomic(output, lambda buf: torch.save(obj, buf))


def save_object(output: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``output``, atomically and with deterministic bytes."""
    _atomic(output, lambda buf: torch.save(obj, buf))


def _atomic(output: Path, write: Callable[[io.BytesIO], object]) -> None:
    """Serialise in memory (torch names a zip's root after the file, so writing to a temp
    name would change the bytes), then a sibling temp file and os.replace."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write(output, buffer.getvalue())


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return (t.detach().to(torch.float64) * s).to(t.dtype)


def scale_module(module: torch.nn.Module, rewrite: Rewrite) -> None:
    """Scale the module's own parameters and buffers in place."""
    state = module.state_dict(keep_vars=True)
    scales = rewrite.tensor_scales(state)
    missing = sorted(set(scales) - set(state))
    if missing:
        raise InputError(f"weights not found in the module: {', '.join(missing)}")
    with torch.no_grad():
        for key, s in scales.items():
            state[key].copy_(_scaled(state[key], s))


def _rewrite_checkpoint(obj: Any, rewrite: Rewrite) -> Any:
    """Scale the named tensors inside a state_dict or checkpoint dict; every other entry
    (optimizer state, epoch, config) is kept as it was."""
    container = obj
    if not is_tensor_dict(obj):
        for key in STATE_KEYS:
            if is_tensor_dict(obj.get(key)):
                container = obj[key]
                break
    names = stripped_names([str(k) for k in container])  # the names the loader reported
    todo = rewrite.tensor_scales({names[str(k)]: v for k, v in container.items()})
    for key in list(container):
        name = names[str(key)]
        if name in todo and isinstance(container[key], torch.Tensor):
            container[key] = _scaled(container[key], todo.pop(name))
    if todo:
        raise InputError(f"weights not found in the checkpoint: {', '.join(sorted(todo))}")
    return obj
