"""ONNX files, read natively with ``onnx`` (weights in initializers or Constant nodes).

The file is parsed as binary protobuf whatever its extension (``onnx.load`` would pick
a text or JSON parser from the name). Every tensor's data must match its declared
shape before the graph is built, so a forged shape is refused without allocating.

External data is read only from regular files inside the model's own folder, named
by a relative path without ``..``, reached through no symlink (the last component is
opened with ``O_NOFOLLOW``), with an offset and length inside the file that match the
tensor's declared size, and without two tensors sharing bytes (so a file can never
make lipcheck read more than the external files hold).
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto, external_data_helper, helper

from ..errors import InputError

# Sub-byte types are packed: these many bits per element.
PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
# Typed (non-raw) fields hold complex numbers as two entries.
COMPLEX_TYPES = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}


# The keys the ONNX standard allows in a tensor's external_data entries.
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})


def load_onnx(path: Path, trust: bool = False) -> onnx.ModelProto:
    """Parse and check an ONNX file, its external data read into memory. ``trust`` allows
    external data reached through a hard link (which could be any file on the disk)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the bytes are not a model
        raise InputError(
            f"{path} is not a model file lipcheck recognises (not ONNX, torch, safetensors or a "
            f"pickle): protobuf parsing failed ({type(exc).__name__})"
        ) from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path} is not an ONNX model (no graph or no nodes in it)")
    bad = _undecodable_string(model)
    if bad:
        raise InputError(f"{path}: the ONNX field {bad} is not valid UTF-8 (damaged file)")
    _check_ops(model, path)
    folder = path.resolve().parent
    claimed: dict[Path, list[tuple[int, int, str]]] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            _load_external(tensor, folder, path, claimed, trust)
        _check_tensor(tensor, path)
    return model


def _check_ops(model: onnx.ModelProto, path: Path) -> None:
    """Every op of the default domain is one the standard defines (or a function the model
    itself defines): an unknown one makes the file invalid ONNX, not an op to skip."""
    local = {(f.domain, f.name) for f in model.functions}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if domain in ("", "ai.onnx") and (domain, node.op_type) not in local \
                    and not onnx.defs.has(node.op_type, ""):
                raise InputError(f"{path}: node '{node.name or node.op_type}' uses op '{node.op_type}', which "
                                 "the ONNX standard does not define (default domain): not a valid ONNX model")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)


def _undecodable_string(message: Message, where: str = "model") -> str:
    """The first string field protobuf could not decode as UTF-8 (it then hands back
    bytes, which no later code expects), or ''."""
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_STRING:
            values = value if _repeated(fd) else [value]
            if any(isinstance(v, bytes) for v in values):
                return f"{where}.{fd.name}"
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            for i, sub in enumerate(value if _repeated(fd) else [value]):
                found = _undecodable_string(sub, f"{where}.{fd.name}[{i}]" if _repeated(fd) else f"{where}.{fd.name}")
                if found:
                    return found
    return ""


def _repeated(fd: FieldDescriptor) -> bool:
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 5; older ones have .label
    if repeated is not None:
        return bool(repeated)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def _type_name(tensor: TensorProto) -> str:
    try:
        return TensorProto.DataType.Name(tensor.data_type)
    except ValueError:
        return str(tensor.data_type)


def _expected_bytes(tensor: TensorProto, where: str) -> int:
    """Raw bytes the tensor's dims and data type call for."""
    count = _element_count(tensor, where)
    name = _type_name(tensor)
    if name in PACKED_BITS:
        return math.ceil(count * PACKED_BITS[name] / 8)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where} has data type {name}, which lipcheck cannot read") from None
    return count * itemsize


def _element_count(tensor: TensorProto, where: str) -> int:
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"{where} has negative dims {list(tensor.dims)}")
    return math.prod(tensor.dims)  # Python ints: a forged shape cannot overflow


def _check_tensor(tensor: TensorProto, model_path: Path) -> None:
    """The data present matches the declared shape (raw bytes, or typed entries)."""
    where = f"{model_path}: tensor '{tensor.name}'"
    if tensor.data_type == TensorProto.UNDEFINED:
        raise InputError(f"{where} has no data type")
    if tensor.data_type == TensorProto.STRING:
        return
    count = _element_count(tensor, where)
    if tensor.raw_data:
        expected = _expected_bytes(tensor, where)
        if len(tensor.raw_data) != expected:
            raise InputError(
                f"{where}: shape {list(tensor.dims)} of {_type_name(tensor)} needs {expected} bytes "
                f"but the tensor holds {len(tensor.raw_data)}"
            )
        return
    if _type_name(tensor) in PACKED_BITS:
        return  # packed entries in int32_data: onnx's reader checks them
    entries = (len(tensor.float_data) + len(tensor.double_data) + len(tensor.int32_data)
               + len(tensor.int64_data) + len(tensor.uint64_data))
    expected = count * (2 if tensor.data_type in COMPLEX_TYPES else 1)
    if entries != expected:
        raise InputError(
            f"{where}: shape {list(tensor.dims)} needs {expected} values but the tensor holds {entries}"
        )


def _parse_int(value: str, key: str, where: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise InputError(f"{where}: external data {key} '{value}' is not a non-negative integer")
    return int(value)


def _load_external(tensor: TensorProto, folder: Path, model_path: Path,
                   claimed: dict[Path, list[tuple[int, int, str]]], trust: bool = False) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{model_path}: external data of tensor '{tensor.name}'"
    unknown = sorted(set(info) - EXTERNAL_KEYS)
    if unknown:
        raise InputError(f"{where} has the key '{unknown[0]}'; the standard allows only "
                         f"{', '.join(sorted(EXTERNAL_KEYS))}")
    if not location or "\x00" in location:
        raise InputError(f"{where} names no usable file ('{location}')")
    if os.path.isabs(location) or PurePosixPath(location).is_absolute() or location.startswith("\\"):
        raise InputError(f"{where} names '{location}': only relative paths inside the model folder are read")
    parts = Path(location).parts
    if ".." in parts:
        raise InputError(f"{where} names '{location}': '..' is not allowed")
    candidate = folder
    for part in parts:
        candidate = candidate / part
        if candidate.is_symlink():
            raise InputError(f"{where} goes through the symlink '{candidate}': refused")
    if folder not in candidate.resolve().parents:
        raise InputError(f"{where} resolves outside the model folder: refused")
    offset = _parse_int(info.get("offset", "0") or "0", "offset", where)
    expected = _expected_bytes(tensor, f"{model_path}: tensor '{tensor.name}'")
    length = _parse_int(info["length"], "length", where) if info.get("length") else expected
    try:
        # O_NOFOLLOW: a symlink swapped in after the checks above still fails here.
        fd = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{where}: file '{location}' not found in the model folder") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot open '{location}': {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{where}: '{location}' is not a regular file")
    if st.st_nlink > 1 and not trust:
        # A hard link can point at any file on the same filesystem (onnx's own loader
        # refuses them too).
        os.close(fd)
        raise InputError(f"{where}: '{location}' has {st.st_nlink} hard links and could be any file on "
                         "the disk: refused; if you trust the model, pass --trust")
    with os.fdopen(fd, "rb") as fh:
        size = st.st_size
        if offset + length > size:
            raise InputError(
                f"{where}: offset {offset} + length {length} is beyond the {size}-byte file '{location}'"
            )
        if length != expected:
            raise InputError(f"{where}: length {length} does not match the tensor's {expected} bytes")
        key = candidate.resolve()
        for begin, end, other in claimed.get(key, []):
            if offset < end and begin < offset + length:
                raise InputError(f"{where}: bytes {offset}..{offset + length} of '{location}' overlap "
                                 f"those of tensor '{other}'")
        claimed.setdefault(key, []).append((offset, offset + length, tensor.name))
        fh.seek(offset)
        tensor.raw_data = fh.read(length)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]
