"""A user-given architecture for weights without a graph: ``--model package.module:factory``.

A state_dict (or a safetensors file) holds weights but not the network that uses them,
so convolutions can only get size-independent bounds and no network bound can be
composed. Given the code that builds the network, lipcheck builds it, loads the weights
strictly (every key, every shape) and analyses it like a pickled module at
``--input-shape``. Importing and calling the factory runs the user's code, hence
``--trust``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import UntrustedInputError, UsageError


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The console script's sys.path lacks the working directory; a user's models package
    usually lives there."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(target: str) -> Any:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"{{param}}: {target} is not a file", param="architecture")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"{{param}}: cannot import {target}", param="architecture")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    with _cwd_on_path():
        return importlib.import_module(target)


def build(spec: str, *, trust: bool) -> torch.nn.Module:
    """The module ``factory()`` returns, for ``spec`` = ``package.module:factory`` or
    ``path/to/file.py:factory`` (a function or a class, called without arguments)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"{{param}} must look like package.module:factory or file.py:factory, got '{spec}'",
                         param="architecture")
    if not trust:
        raise UntrustedInputError(f"--model {spec} imports and runs Python code; pass --trust to allow it")
    try:
        module = _import(target)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's code's
        raise UsageError(f"{{param}}: cannot import {target}: {type(exc).__name__}: {exc}",
                         param="architecture") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{{param}}: {target} has no callable '{attr}'", param="architecture")
    try:
        built = factory()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{{param}}: {spec}() failed: {type(exc).__name__}: {exc}", param="architecture") from None
    if not isinstance(built, torch.nn.Module):
        raise UsageError(f"{{param}}: {spec}() returned a {type(built).__name__}, not a torch.nn.Module",
                         param="architecture")
    return built


def load_weights(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], spec: str, source: Path) -> None:
    """``load_state_dict(strict=True)``: a missing, unexpected or misshapen key is an error
    naming it, never a silently half-loaded model."""
    try:
        module.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        raise UsageError(f"{{param}} {spec}: the weights in {source} do not fit it: {text[:400]}",
                         param="architecture") from None
