"""torch files: TorchScript, torch.save (state_dict, checkpoint dict, pickled module)
and torch.export archives.

``torch.load`` always runs with ``weights_only=True`` unless the user passed
``--trust``: only that mode refuses to run code stored in the file. A module with
a graph is exported in memory to ONNX (the TorchScript-based exporter, which
keeps BatchNorm as its own node) and analysed like any ONNX model.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from . import Format, Loaded

# Keys under which checkpoints commonly keep their weights, most specific first.
STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network",
              "module", "weights", "params", "ema", "model_ema")
ONNX_OPSET = 17


def load(path: Path, fmt: Format, *, trust: bool, input_shape: tuple[int, ...] | None) -> Loaded:
    if fmt is Format.TORCHSCRIPT:
        module = _jit_load(path)
        return _from_module(module, fmt.value, input_shape, scripted=True)
    if fmt is Format.TORCH_EXPORT:
        return _load_export(path, trust, input_shape)
    obj = _torch_load(path, trust)
    if isinstance(obj, torch.nn.Module):
        return _from_module(obj, "pickled-module", input_shape, scripted=False)
    if isinstance(obj, Mapping):
        module = _find_module(obj)
        if module is not None:
            return _from_module(module, "checkpoint-module", input_shape, scripted=False)
        key, tensors = _find_state_dict(obj)
        if not tensors:
            raise InputError(f"{path}: no tensors found in the checkpoint (keys: {_keys(obj)})")
        loaded = Loaded(format="state_dict", tensors=tensors, input_shape=input_shape)
        loaded.why_no_graph = (
            "a state_dict has weights but no graph, so no network bound can be composed; "
            "analyse the ONNX or TorchScript form (with --input-shape) for one"
        )
        if key:
            loaded.notes.append(f"weights read from checkpoint key '{key}'")
        return loaded
    raise InputError(f"{path}: holds a {type(obj).__name__}, not a model or a state_dict")


def _keys(obj: Mapping[str, Any]) -> str:
    keys = [str(k) for k in list(obj)[:8]]
    return ", ".join(keys) + (", ..." if len(obj) > 8 else "")


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and friends
        raise InputError(f"{path} is not a loadable TorchScript archive: {_first_line(exc)}") from None


GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|global ['`]?([\w.]+)['`]?", re.IGNORECASE)


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if not trust and ("weights_only" in text or "Unsupported global" in text
                          or "Weights only load failed" in text):
            match = GLOBAL_RE.search(text)
            what = match.group(1) or match.group(2) if match else None
            named = f" (it references {what})" if what else ""
            raise UntrustedInputError(
                f"{path} holds pickled Python objects{named} that only run as code; lipcheck "
                "loads weights only by default. If you trust this file, pass --trust."
            ) from None
        raise InputError(f"{path} cannot be read by torch.load: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _find_module(obj: Mapping[str, Any]) -> torch.nn.Module | None:
    for key in STATE_KEYS:
        if isinstance(obj.get(key), torch.nn.Module):
            return obj[key]
    return None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def _find_state_dict(obj: Mapping[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    if _is_tensor_dict(obj):
        return "", _strip_prefix(dict(obj))
    for key in STATE_KEYS:
        if _is_tensor_dict(obj.get(key)):
            return key, _strip_prefix(dict(obj[key]))
    # Otherwise: every tensor in the dict, nested keys joined with '.'.
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    return "", _strip_prefix(flat)


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel / DistributedDataParallel save every key under 'module.'."""
    for prefix in ("module.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _load_export(path: Path, trust: bool, input_shape: tuple[int, ...] | None) -> Loaded:
    if not trust:
        raise UntrustedInputError(
            f"{path} is a torch.export archive; its loader can unpickle Python objects, so "
            "lipcheck opens it only with --trust"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path} is not a loadable torch.export archive: {_first_line(exc)}") from None
    if input_shape is None:
        metas = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]
        user = [m for m in metas if isinstance(m, torch.Tensor)]
        if user:
            input_shape = tuple(int(d) for d in user[-1].shape)
    return _from_module(program.module(), Format.TORCH_EXPORT.value, input_shape, scripted=False)


def _from_module(module: torch.nn.Module, fmt: str, input_shape: tuple[int, ...] | None,
                 scripted: bool) -> Loaded:
    if input_shape is None:
        loaded = Loaded(format=fmt, tensors=_module_tensors(module))
        loaded.why_no_graph = (
            f"a {fmt} model carries no input shape; pass --input-shape (e.g. 1,3,224,224) "
            "to trace its graph and compose a network bound"
        )
        return loaded
    return Loaded(format=fmt, onnx_model=to_onnx(module, input_shape), input_shape=input_shape)


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.state_dict())
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...]) -> Any:
    """Export in memory with the TorchScript-based exporter: it keeps BatchNorm nodes
    (the dynamo exporter folds them into convs) and accepts ScriptModules."""
    import onnx

    try:
        module.eval()
    except NotImplementedError:
        pass  # a torch.export module is fixed at export time and refuses eval()
    example = torch.zeros(input_shape)
    buffer = io.BytesIO()
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE, opset_version=ONNX_OPSET,
                input_names=["input"],
            )
    except Exception as exc:  # noqa: BLE001 - export failures are the model's, not ours
        raise InputError(
            f"cannot trace the model at input shape {','.join(map(str, input_shape))}: "
            f"{_first_line(exc)}"
        ) from None
    return onnx.load_model_from_string(buffer.getvalue())
