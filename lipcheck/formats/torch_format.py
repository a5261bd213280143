"""torch files, the door: TorchScript, torch.save (state_dict, checkpoint dict, pickled module),
raw pickles and torch.export archives, each handed to the module for its role.

Nothing stored in a file runs unless the user passed ``--trust``:

* ``torch.load`` always runs with ``weights_only=True`` (torch's restricted unpickler),
  and the allow-list suggestions in its error text are never applied; a refusal names
  the offending global (:mod:`.torch_pickle`).
* Before torch sees a file, the sizes it declares are checked against the file's size
  (zip members; legacy storages), so a forged size is refused without allocating
  (:mod:`.torch_pickle`).
* TorchScript weights (no ``--input-shape``) are read without ``torch.jit.load``, which would
  run the archive's ``__setstate__`` code (:mod:`.torchscript`). With ``--input-shape`` the
  module is loaded and traced, which runs its code.
* torch.export archives and raw (non-torch) pickles are opened only with ``--trust``.

Where a checkpoint keeps its weights: :mod:`.state_dicts`. A module with a graph is exported
in memory to ONNX and analysed like any ONNX model (:mod:`.module_export`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from . import Format, Kind, Loaded
from .module_export import from_module, load_export
from .state_dicts import find_module, find_state_dict
from .torch_pickle import check_legacy_sizes, check_zip_sizes, is_zip, raw_pickle_load, torch_load
from .torchscript import jit_load, script_weights


def load(path: Path, fmt: Format, *, trust: bool, input_shape: tuple[int, ...] | None,
         architecture: str | None = None) -> Loaded:
    zipped = is_zip(path)
    if zipped:
        check_zip_sizes(path)
    if fmt is Format.TORCHSCRIPT:
        if input_shape is None:
            return script_weights(path, trust)
        if not trust:
            raise UntrustedInputError(
                f"{path} is a TorchScript archive: tracing its graph (--input-shape) runs the code stored "
                "in it (torch.jit.load runs its __setstate__, tracing runs forward). If you trust it, pass "
                "--trust; without --input-shape its weights are read without running anything.")
        module = jit_load(path)
        return from_module(module, Kind.TORCHSCRIPT, input_shape)
    if fmt is Format.TORCH_EXPORT:
        return load_export(path, trust, input_shape)
    if fmt is Format.PICKLE:
        obj = raw_pickle_load(path, trust)
    else:
        if not zipped:
            check_legacy_sizes(path)
        obj = torch_load(path, trust)
    return _from_object(path, obj, input_shape, architecture, trust)


def _from_object(path: Path, obj: Any, input_shape: tuple[int, ...] | None,
                 architecture: str | None = None, trust: bool = False) -> Loaded:
    if architecture is not None and (isinstance(obj, torch.nn.Module) or (
            isinstance(obj, Mapping) and find_module(obj) is not None)):
        from ..errors import UsageError

        raise UsageError(f"{{param}} is for files of weights only; {path} holds a pickled module "
                         "with its own architecture", param="architecture")
    if isinstance(obj, torch.nn.Module):
        return from_module(obj, Kind.PICKLED_MODULE, input_shape)
    if isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        obj = {str(i): v for i, v in enumerate(obj)}
    if isinstance(obj, Mapping):
        module = find_module(obj)
        if module is not None:
            return from_module(module, Kind.CHECKPOINT_MODULE, input_shape)
        key, tensors = find_state_dict(obj)
        if not tensors:
            raise InputError(f"{path}: no tensors found in the checkpoint (keys: {_keys(obj)})")
        if architecture is not None:
            from .. import architecture as arch

            module = arch.build(architecture, trust=trust)
            arch.load_weights(module, tensors, architecture, path)
            built = from_module(module, Kind.STATE_DICT, input_shape)
            if key:
                built.notes.append(f"weights read from checkpoint key '{key}'")
            return built
        if input_shape is not None:
            from ..errors import UsageError
            from . import NO_GRAPH_SHAPE

            raise UsageError(NO_GRAPH_SHAPE.format(what=f"the state_dict in {path}"))
        loaded = Loaded(format=Kind.STATE_DICT, tensors=tensors, input_shape=input_shape)
        loaded.why_no_graph = (
            "a state_dict has weights but no graph, so no network bound can be composed; "
            "analyse the ONNX or TorchScript form (with --input-shape) for one"
        )
        if key:
            loaded.notes.append(f"weights read from checkpoint key '{key}'")
        return loaded
    raise InputError(f"{path}: holds a {type(obj).__name__}, not a model or a state_dict")


def _keys(obj: Mapping[Any, Any]) -> str:
    keys = [str(k) for k in list(obj)[:8]]
    return ", ".join(keys) + (", ..." if len(obj) > 8 else "")
