"""TorchScript archives. Without ``--input-shape`` their weights are read by
:class:`_ScriptUnpickler`, which rebuilds tensors from the archive's records (sizes checked)
and stands in inert placeholders for the archive's classes: ``torch.jit.load`` would run the
archive's ``__setstate__`` code. With ``--input-shape`` (and ``--trust``) the module is
loaded and traced, which runs its code."""

from __future__ import annotations

import io
import math
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from . import Kind, Loaded
from .module_export import from_module, per_tensor
from .state_dicts import ScriptObject, walk_tensors
from .torch_pickle import STORAGE_DTYPES, first_line


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Refused(Exception):
    """A TorchScript pickle names a Python global the static reader does not provide."""


def _identity(value: Any, *rest: Any) -> Any:
    return value


class _ScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl without torch.jit: tensors are rebuilt from
    the archive's records (sizes checked), ``__torch__`` classes become inert
    :class:`ScriptObject` placeholders, and any other global is refused."""

    def __init__(self, fh: Any, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(fh)
        self.zf, self.prefix, self.path = zf, prefix, path
        self.storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if full not in self._classes:
                self._classes[full] = type("ScriptObject", (ScriptObject,), {"qualname": full})
            return self._classes[full]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return self._rebuild_tensor
        if full == "collections.OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
            return _identity
        raise _Refused(full)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise InputError(f"{self.path}: TorchScript archive has an unknown persistent id")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, dtype, numel)
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        record = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(record)
        except KeyError:
            raise InputError(f"{self.path}: TorchScript archive lacks the data record '{record}'") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if numel < 0 or info.file_size != numel * itemsize:
            raise InputError(
                f"{self.path}: record '{record}' holds {info.file_size} bytes but its storage "
                f"declares {numel} elements of {itemsize} bytes"
            )
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        raw = bytearray(self.zf.read(record))
        return torch.frombuffer(raw, dtype=dtype)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
        ok = (isinstance(storage, torch.Tensor) and _ints(size) and _ints(stride)
              and isinstance(offset, int) and len(size) == len(stride))
        if not ok or offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
            raise InputError(f"{self.path}: TorchScript archive has a malformed tensor")
        if math.prod(size) > 0:
            last = offset + sum((d - 1) * s for d, s in zip(size, stride))
            if last >= storage.numel():
                raise InputError(
                    f"{self.path}: a tensor of shape {list(size)} needs {last + 1} elements but its "
                    f"storage holds {storage.numel()}"
                )
        return storage.as_strided(tuple(size), tuple(stride), offset)


def _ints(values: Any) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def script_weights(path: Path, trust: bool) -> Loaded:
    """Per-tensor analysis of a TorchScript archive, read without running its code."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkls:
                raise InputError(f"{path}: TorchScript archive without data.pkl")
            pkl = min(pkls, key=len)
            unpickler = _ScriptUnpickler(io.BytesIO(zf.read(pkl)), zf, pkl[: -len("data.pkl")], path)
            root = unpickler.load()
    except _Refused as exc:
        if trust:
            module = jit_load(path)
            return from_module(module, Kind.TORCHSCRIPT, None)
        raise UntrustedInputError(
            f"{path} is a TorchScript archive whose weights reference the Python global {exc}; "
            "reading them needs torch.jit.load, which runs code from the file. If you trust it, pass --trust."
        ) from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged pickle or zip: the file's fault
        raise InputError(f"{path} is a damaged TorchScript archive: {first_line(exc)}") from None
    tensors: dict[str, torch.Tensor] = {}
    walk_tensors("", root, tensors, set())
    if not tensors:
        raise InputError(f"{path}: no tensors found in the TorchScript archive")
    return per_tensor(Kind.TORCHSCRIPT, tensors)


def jit_load(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and friends
        raise InputError(f"{path} is not a loadable TorchScript archive: {first_line(exc)}") from None
