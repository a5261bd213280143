"""torch files: TorchScript, torch.save (state_dict, checkpoint dict, pickled module),
raw pickles and torch.export archives.

Nothing stored in a file runs unless the user passed ``--trust``:

* ``torch.load`` always runs with ``weights_only=True`` (torch's restricted unpickler),
  and the allow-list suggestions in its error text are never applied; a refusal names
  the offending global.
* Before torch sees a file, the sizes it declares are checked against the file's size
  (zip members; legacy storages), so a forged size is refused without allocating.
* TorchScript weights (no ``--input-shape``) are read by :class:`_ScriptUnpickler`,
  which builds tensors from the archive's records and stands in inert placeholders for
  the archive's classes: ``torch.jit.load`` would run the archive's ``__setstate__``
  code. With ``--input-shape`` the module is loaded and traced, which runs its code.
* torch.export archives and raw (non-torch) pickles are opened only with ``--trust``.

A module with a graph is exported in memory to ONNX (the TorchScript-based exporter,
which keeps BatchNorm as its own node) and analysed like any ONNX model.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from . import ZIP_ERRORS, Format, Kind, Loaded

# Keys under which checkpoints commonly keep their weights, most specific first.
STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network",
              "module", "weights", "params", "ema", "model_ema")
ONNX_OPSET = 17
# Deflate cannot expand data more than 1032:1; a zip member claiming more is forged.
MAX_DEFLATE_RATIO = 1032
MAX_NAMED_GLOBALS = 3


def load(path: Path, fmt: Format, *, trust: bool, input_shape: tuple[int, ...] | None,
         architecture: str | None = None) -> Loaded:
    is_zip = _is_zip(path)
    if is_zip:
        check_zip_sizes(path)
    if fmt is Format.TORCHSCRIPT:
        if input_shape is None:
            return _script_weights(path, trust)
        if not trust:
            raise UntrustedInputError(
                f"{path} is a TorchScript archive: tracing its graph (--input-shape) runs the code stored "
                "in it (torch.jit.load runs its __setstate__, tracing runs forward). If you trust it, pass "
                "--trust; without --input-shape its weights are read without running anything.")
        module = jit_load(path)
        return from_module(module, Kind.TORCHSCRIPT, input_shape)
    if fmt is Format.TORCH_EXPORT:
        return _load_export(path, trust, input_shape)
    if fmt is Format.PICKLE:
        obj = _raw_pickle_load(path, trust)
    else:
        if not is_zip:
            check_legacy_sizes(path)
        obj = torch_load(path, trust)
    return _from_object(path, obj, input_shape, architecture, trust)


def _is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"PK"


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
        key, tensors = _find_state_dict(obj)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- size checks


def check_zip_sizes(path: Path) -> None:
    """Every member's declared sizes fit in the file: torch's zip reader allocates a
    record's declared size before reading it."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except ZIP_ERRORS as exc:
        raise InputError(f"{path} is a damaged or truncated zip archive: {exc}") from None
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise InputError(
                f"{path}: zip member '{info.filename}' declares {info.compress_size} bytes at offset "
                f"{info.header_offset}, beyond the {size}-byte file (truncated or forged)"
            )
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
            info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1)
        ):
            raise InputError(
                f"{path}: zip member '{info.filename}' declares {info.file_size} bytes from "
                f"{info.compress_size} stored bytes (forged size)"
            )


# Bytes per element of each storage class named in torch.save pickles.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
    "QInt8Storage": torch.int8, "QUInt8Storage": torch.uint8, "QInt32Storage": torch.int32,
}


class _Opaque:
    """Stands in for every global a scanned pickle names: calling, building or filling
    it does nothing, so a scan never imports or runs anything."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _ScanUnpickler(pickle.Unpickler):
    """Walks a pickle with placeholders for all globals and records the storages its
    persistent ids declare: ('storage', type, key, location, numel[, view])."""

    def __init__(self, fh: Any) -> None:
        super().__init__(fh)
        self.storages: dict[str, tuple[str, int]] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._classes:
            self._classes[full] = type("Opaque", (_Opaque,), {"qualname": full})
        return self._classes[full]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "qualname", "?").rpartition(".")[2]
            if isinstance(pid[2], str) and isinstance(pid[4], int):
                self.storages[pid[2]] = (kind, pid[4])
        return _Opaque()


def check_legacy_sizes(path: Path) -> None:
    """A legacy torch.save file is five pickles (magic, protocol, sys info, the object,
    the storage keys) and then, per key, an int64 element count and the raw bytes.
    torch allocates each declared storage before reading it, so the declared counts are
    checked against the bytes that are really there first. A file this scan cannot
    follow is left to torch's own checks."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        try:
            for _ in range(3):
                _ScanUnpickler(fh).load()
            scan = _ScanUnpickler(fh)
            scan.load()
            keys = _ScanUnpickler(fh).load()
        except Exception:  # noqa: BLE001 - not a scannable legacy file; torch will say why
            return
        if not isinstance(keys, list):
            return
        position = fh.tell()
        for key in keys:
            if key not in scan.storages:
                return
            kind, numel = scan.storages[key]
            dtype = STORAGE_DTYPES.get(kind)
            if dtype is None:
                return
            itemsize = torch.empty((), dtype=dtype).element_size()
            fh.seek(position)
            count = fh.read(8)
            if len(count) < 8:
                raise InputError(f"{path}: legacy torch.save file is truncated (storage '{key}' is missing)")
            stored = int.from_bytes(count, "little", signed=True)
            need = 8 + numel * itemsize
            if numel < 0 or stored != numel or position + need > size:
                raise InputError(
                    f"{path}: storage '{key}' declares {numel} elements ({numel * itemsize} bytes) but "
                    f"the file holds {max(size - position - 8, 0)} bytes from there (truncated or forged)"
                )
            position += need


# --------------------------------------------------------------------------- torch.load


GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# Words in torch's weights_only errors that say a global was refused, not that the
# pickle is damaged.
REFUSED_WORDS = ("Unsupported global", "unsupported GLOBAL", "Unsupported class", "not an allowed global")


def torch_load(path: Path, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, ...
        text = str(exc)
        if trust or "Weights only load failed" not in text:
            raise InputError(f"{path} cannot be read by torch.load: {_first_line(exc)}") from None
        named = GLOBAL_RE.findall(text) or _unsafe_globals(path)
        if named or any(word in text for word in REFUSED_WORDS):
            raise UntrustedInputError(
                f"{path} holds pickled Python objects{_naming(named)} that only load by running code; "
                "lipcheck loads weights only by default. If you trust this file, pass --trust."
            ) from None
        reason = _weights_unpickler_reason(text)
        raise InputError(f"{path} is a damaged torch.save file: {reason}") from None


def _naming(names: list[str]) -> str:
    if not names:
        return ""
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:MAX_NAMED_GLOBALS]) + (", ..." if len(unique) > MAX_NAMED_GLOBALS else "")
    return f" (it references {shown})"


def _weights_unpickler_reason(text: str) -> str:
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # torch puts the unpickler's own words after a blank line, before the docs link.
    candidates = [ln for ln in lines if not ln.startswith(("Weights only", "Check the documentation",
                                                           "Please file", "(1)", "(2)", "In PyTorch"))]
    return candidates[0][:300] if candidates else "its pickle cannot be read"


def pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle names, read statically with pickletools (nothing is
    unpickled). STACK_GLOBAL takes its module and name from the last two strings pushed,
    which are tracked through the memo."""
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE") and isinstance(arg, str):
                strings.append(arg)
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings and isinstance(arg, int):
                memo[arg] = strings[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int) and arg in memo:
                strings.append(memo[arg])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - a damaged pickle: report what was read so far
        pass
    return names


def _unsafe_globals(path: Path) -> list[str]:
    """Globals in the file's pickle that torch's weights-only unpickler does not allow."""
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as zf:
                pkl = min((n for n in zf.namelist() if n.endswith("data.pkl")), key=len)
                data = zf.read(pkl)
        else:
            with path.open("rb") as fh:
                data = fh.read(1 << 20)
            data = _skip_pickles(data, 3)
    except Exception:  # noqa: BLE001 - best effort: the message just names nothing
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private API; without it every global is named
        allowed = set()
    return [n for n in pickle_globals(data) if n not in allowed]


def _skip_pickles(data: bytes, count: int) -> bytes:
    position = 0
    for _ in range(count):
        for op, _, pos in pickletools.genops(data[position:]):
            if op.name == "STOP":
                assert pos is not None  # genops gives positions for in-memory data
                position += pos + 1
                break
    return data[position:]


def _raw_pickle_load(path: Path, trust: bool) -> Any:
    """A pickle that is not a torch.save file: torch.load cannot read it, and only a
    plain unpickler can, which runs whatever the pickle names. Refused without --trust."""
    with path.open("rb") as fh:
        data = fh.read(1 << 20)
    if not trust:
        names = pickle_globals(data)
        if names:
            raise UntrustedInputError(
                f"{path} is a plain Python pickle, not a torch.save file{_naming(names)}; unpickling "
                "it runs code, so lipcheck opens it only with --trust"
            )
        raise InputError(f"{path} is a plain Python pickle with no tensors in it (or a damaged one)")
    try:
        with path.open("rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - the pickle is the user's; any failure is the file's
        raise InputError(f"{path} cannot be unpickled: {_first_line(exc)}") from None


# --------------------------------------------------------------------------- state dicts


def find_module(obj: Mapping[Any, Any]) -> torch.nn.Module | None:
    for key in STATE_KEYS:
        if isinstance(obj.get(key), torch.nn.Module):
            return obj[key]
    return None


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def _find_state_dict(obj: Mapping[Any, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    if is_tensor_dict(obj):
        return "", _strip_prefix({str(k): v for k, v in obj.items()})
    for key in STATE_KEYS:
        if is_tensor_dict(obj.get(key)):
            return key, _strip_prefix({str(k): v for k, v in obj[key].items()})
    # Otherwise: every tensor in the dict (and in its lists), nested keys joined with '.'.
    flat: dict[str, torch.Tensor] = {}
    _walk_tensors("", obj, flat, set())
    return "", _strip_prefix(flat)


def _walk_tensors(prefix: str, value: Any, out: dict[str, torch.Tensor], seen: set[int]) -> None:
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
    elif isinstance(value, _ScriptObject):
        seen.add(id(value))
        state = value.state
        items = list(state.items()) if isinstance(state, Mapping) else list(enumerate(
            state if isinstance(state, (list, tuple)) else [state]))
        # A module's own tensors come before its submodules', as in state_dict().
        items.sort(key=lambda kv: not isinstance(kv[1], torch.Tensor))
    else:
        return
    for k, v in items:
        _walk_tensors(f"{prefix}.{k}" if prefix else str(k), v, out, seen)


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


# --------------------------------------------------------------------------- TorchScript


class _ScriptObject:
    """An instance of a TorchScript class, reduced to the state the archive stores."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _ScriptObject:
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


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
    :class:`_ScriptObject` placeholders, and any other global is refused."""

    def __init__(self, fh: Any, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(fh)
        self.zf, self.prefix, self.path = zf, prefix, path
        self.storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if full not in self._classes:
                self._classes[full] = type("ScriptObject", (_ScriptObject,), {"qualname": full})
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


def _script_weights(path: Path, trust: bool) -> Loaded:
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
        raise InputError(f"{path} is a damaged TorchScript archive: {_first_line(exc)}") from None
    tensors: dict[str, torch.Tensor] = {}
    _walk_tensors("", root, tensors, set())
    if not tensors:
        raise InputError(f"{path}: no tensors found in the TorchScript archive")
    return _per_tensor(Kind.TORCHSCRIPT, tensors)


def jit_load(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and friends
        raise InputError(f"{path} is not a loadable TorchScript archive: {_first_line(exc)}") from None


# --------------------------------------------------------------------------- torch.export


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
    return from_module(program.module(), Kind.TORCH_EXPORT, input_shape)


# --------------------------------------------------------------------------- modules


def _per_tensor(fmt: Kind, tensors: dict[str, torch.Tensor]) -> Loaded:
    loaded = Loaded(format=fmt, tensors=tensors)
    loaded.why_no_graph = (
        f"a {fmt.value} model carries no input shape; pass --input-shape (e.g. 1,3,224,224) "
        "to trace its graph and compose a network bound"
    )
    return loaded


def from_module(module: torch.nn.Module, fmt: Kind, input_shape: tuple[int, ...] | None) -> Loaded:
    """A module's analysis input: traced to ONNX at ``input_shape``, else its tensors."""
    if input_shape is None:
        return _per_tensor(fmt, _module_tensors(module))
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
