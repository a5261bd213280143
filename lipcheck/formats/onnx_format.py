"""ONNX files, read natively with ``onnx`` (weights in initializers or Constant nodes).

External data is read only from regular files inside the model's own folder,
named by a relative path without ``..``, reached through no symlink, and with an
offset and length inside the file that match the tensor's declared size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper

from ..errors import InputError


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path} is not a valid ONNX model ({type(exc).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path} is not an ONNX model (no graph or no nodes in it)")
    folder = path.resolve().parent
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            _load_external(tensor, folder, path)
    return model


def _load_external(tensor: TensorProto, folder: Path, model_path: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{model_path}: external data of tensor '{tensor.name}'"
    if not location or os.path.isabs(location) or Path(location).is_absolute():
        raise InputError(f"{where} names '{location}': only relative paths inside the model folder are read")
    parts = Path(location).parts
    if ".." in parts:
        raise InputError(f"{where} names '{location}': '..' is not allowed")
    candidate = folder
    for part in parts:
        candidate = candidate / part
        if candidate.is_symlink():
            raise InputError(f"{where} goes through the symlink '{candidate}': refused")
    if not candidate.is_file():
        raise InputError(f"{where}: file '{location}' not found in the model folder")
    if folder not in candidate.resolve().parents:
        raise InputError(f"{where} resolves outside the model folder: refused")
    size = candidate.stat().st_size
    offset = int(info.get("offset", 0) or 0)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    expected = int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    length = int(info["length"]) if info.get("length") else expected
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(
            f"{where}: offset {offset} + length {length} is beyond the {size}-byte file '{location}'"
        )
    if length != expected:
        raise InputError(
            f"{where}: length {length} does not match the tensor's {expected} bytes"
        )
    with candidate.open("rb") as fh:
        fh.seek(offset)
        tensor.raw_data = fh.read(length)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]
