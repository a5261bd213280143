"""torch modules as analysis inputs: exported in memory to ONNX at the input shape (the
TorchScript-based exporter first, which keeps BatchNorm as its own node, then the dynamo
exporter), or read as their tensors without a shape; torch.export archives (only with
``--trust``)."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from . import Kind, Loaded
from .torch_pickle import first_line

ONNX_OPSET = 17


# --------------------------------------------------------------------------- torch.export


def load_export(path: Path, trust: bool, input_shape: tuple[int, ...] | None) -> Loaded:
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
        raise InputError(f"{path} is not a loadable torch.export archive: {first_line(exc)}") from None
    if input_shape is None:
        metas = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]
        user = [m for m in metas if isinstance(m, torch.Tensor)]
        if user:
            input_shape = tuple(int(d) for d in user[-1].shape)
    return from_module(program.module(), Kind.TORCH_EXPORT, input_shape)


# --------------------------------------------------------------------------- modules


def per_tensor(fmt: Kind, tensors: dict[str, torch.Tensor]) -> Loaded:
    loaded = Loaded(format=fmt, tensors=tensors)
    loaded.why_no_graph = (
        f"a {fmt.value} model carries no input shape; pass --input-shape (e.g. 1,3,224,224) "
        "to trace its graph and compose a network bound"
    )
    return loaded


def from_module(module: torch.nn.Module, fmt: Kind, input_shape: tuple[int, ...] | None) -> Loaded:
    """A module's analysis input: traced to ONNX at ``input_shape``, else its tensors."""
    if input_shape is None:
        return per_tensor(fmt, _module_tensors(module))
    return Loaded(format=fmt, onnx_model=to_onnx(module, input_shape), input_shape=input_shape)


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.state_dict())
    return {str(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def _silenced_fds() -> Any:
    """The exporter's C++ side prints the whole IR graph to fd 1 when it fails; stdout is
    for data (JSON) only, so both fds point to /dev/null while it runs."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


_SYMBOLICS_REGISTERED = False


def _register_symbolics() -> None:
    """ONNX translations the TorchScript-based exporter lacks: ``aten::vdot``, which torch's
    parametrized spectral_norm computes u.(W v) with (real vectors: the sum of products)."""
    global _SYMBOLICS_REGISTERED
    if _SYMBOLICS_REGISTERED:
        return

    def vdot(g: Any, a: Any, b: Any) -> Any:
        return g.op("ReduceSum", g.op("Mul", a, b), keepdims_i=0)

    torch.onnx.register_custom_op_symbolic("aten::vdot", vdot, 1)
    _SYMBOLICS_REGISTERED = True


@contextlib.contextmanager
def _quiet() -> Any:
    """Exporters print progress and whole graphs; stdout is for data."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
            _silenced_fds():
        warnings.simplefilter("ignore")
        yield


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _export_failure(exc: BaseException) -> str:
    """Why an export step failed, in one line: the innermost cause (the dynamo exporter wraps
    it in a page of advice with terminal colours), its type and first line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _exported_program(module: torch.nn.Module, example: torch.Tensor) -> Any:
    """The module as a torch.export ExportedProgram, its fused attention kernels written out
    (see :mod:`.fused`). A ScriptModule is converted from its TorchScript graph, since
    torch.export does not take ScriptModules."""
    from . import fused

    if isinstance(module, torch.jit.ScriptModule):
        from torch._export.converter import TS2EPConverter

        program = TS2EPConverter(module, (example,)).convert()
    else:
        try:
            program = torch.export.export(module, (example,), strict=False)
        except Exception:  # noqa: BLE001 - torch.onnx's own order: non-strict, then strict
            program = torch.export.export(module, (example,), strict=True)
    decompositions = fused.table()
    if any(n.target in decompositions for n in program.graph.nodes):
        program = program.run_decompositions(decompositions)
    return program


def _forward_arguments(module: torch.nn.Module) -> list[str]:
    """The names of a ScriptModule's forward arguments after ``self`` ([] when unknown)."""
    try:
        return [a.name for a in module.forward.schema.arguments[1:]]  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return []


def to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...]) -> Any:
    """Export in memory, trying two exporters in turn.

    1. The TorchScript-based ("legacy") exporter at opset ``ONNX_OPSET``: it keeps BatchNorm
       as its own node and names nodes by module scope, and takes ScriptModules.
    2. When it fails (an op it cannot translate: ``_native_multi_head_attention``, the SDPA
       of a pickled TransformerEncoderLayer, ...), the dynamo exporter on a torch.export
       program of the module (a ScriptModule converted by torch's TorchScript converter).
       A converted ScriptModule has no module scopes, so the graph is not optimized: the
       weights keep their parameter names (the optimizer would fold their transposes into
       new, unnamed initializers).

    The ONNX model stays in memory (the dynamo exporter's ``.onnx.data`` is never written).
    When both fail, one InputError names each step and why it failed.
    """
    import onnx

    try:
        module.eval()
    except NotImplementedError:
        pass  # a torch.export module is fixed at export time and refuses eval()
    example = torch.zeros(input_shape)
    failures = []
    buffer = io.BytesIO()
    try:
        _register_symbolics()
        with _quiet():
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, do_constant_folding=False,  # type: ignore[arg-type]
                training=torch.onnx.TrainingMode.PRESERVE, opset_version=ONNX_OPSET,
                input_names=["input"],
            )
        return onnx.load_model_from_string(buffer.getvalue())
    except Exception as exc:  # noqa: BLE001 - export failures are the model's, not ours
        failures.append(f"legacy exporter (opset {ONNX_OPSET}): {_export_failure(exc)}")
    script = isinstance(module, torch.jit.ScriptModule)
    step = "converting TorchScript to torch.export" if script else "torch.export"
    try:
        with _quiet():
            program = _exported_program(module, example)
            step = "translating to ONNX"
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, verbose=False,
                                             input_names=["input"], optimize=not script)
        assert onnx_program is not None
        return onnx_program.model_proto
    except Exception as exc:  # noqa: BLE001
        failures.append(f"dynamo exporter ({step}): {_export_failure(exc)}")
    arguments = _forward_arguments(module) if script else []
    if len(arguments) > 1:
        failures.append(f"note: forward takes {len(arguments)} arguments ({', '.join(arguments)}); "
                        "lipcheck passes only the input")
    raise InputError(f"cannot trace the model at input shape {','.join(map(str, input_shape))}: "
                     + "; ".join(failures))
