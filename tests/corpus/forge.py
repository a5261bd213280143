"""Building blocks: harmless payloads, torch pickles assembled opcode by opcode (so sizes,
shapes and globals can be forged without importing or calling anything), torch zip and
legacy archives, safetensors bytes and small ONNX models."""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
MARKER_NAME = "PWNED-marker"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --------------------------------------------------------------------------- payloads


class OpenPayload:
    """Unpickling calls open(marker, 'w'): creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


class SystemPayload:
    """Unpickling calls os.system('touch marker')."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------- pickle assembly


class _Pickle:
    """Protocol-2 pickle opcodes, assembled by hand (nothing is imported or called)."""

    @staticmethod
    def s(text: str) -> bytes:
        raw = text.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    @staticmethod
    def i(n: int) -> bytes:
        if -(2**31) <= n < 2**31:
            return b"J" + struct.pack("<i", n)
        raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    @staticmethod
    def g(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    @staticmethod
    def tup(*items: bytes) -> bytes:
        return b"(" + b"".join(items) + b"t"

    @staticmethod
    def dict(pairs: list[tuple[bytes, bytes]]) -> bytes:
        return b"}(" + b"".join(k + v for k, v in pairs) + b"u"

    @staticmethod
    def call(fn: bytes, args: bytes) -> bytes:
        return fn + args + b"R"

    @staticmethod
    def whole(body: bytes) -> bytes:
        return b"\x80\x02" + body + b"."

    @classmethod
    def tensor(cls, key: str, numel: int, size: list[int], stride: list[int] | None = None,
               offset: int = 0, storage: str = "FloatStorage", legacy: bool = False) -> bytes:
        """torch._utils._rebuild_tensor_v2 over persistent storage ``key``."""
        if stride is None:
            stride, acc = [], 1
            for d in reversed(size):
                stride.insert(0, acc)
                acc *= d
        extra = [b"N"] if legacy else []  # legacy ids carry view metadata
        pid = cls.tup(cls.s("storage"), cls.g("torch", storage), cls.s(key), cls.s("cpu"), cls.i(numel),
                      *extra) + b"Q"
        hooks = cls.call(cls.g("collections", "OrderedDict"), b")")
        args = cls.tup(pid, cls.i(offset), cls.tup(*map(cls.i, size)), cls.tup(*map(cls.i, stride)),
                       b"\x89", hooks)
        return cls.call(cls.g("torch._utils", "_rebuild_tensor_v2"), args)


P = _Pickle
FOUR_FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def torch_zip(path: Path, body: bytes, records: dict[str, bytes], extra: dict[str, bytes] | None = None,
              prefix: str = "archive") -> None:
    """A torch.save zip archive: data.pkl, data/<key> records, version, byteorder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", P.whole(body))
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, raw in records.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        for name, raw in (extra or {}).items():
            zf.writestr(f"{prefix}/{name}", raw)
        zf.writestr(f"{prefix}/version", "3\n")


def torch_legacy(path: Path, body: bytes, storages: list[tuple[str, int, bytes]]) -> None:
    """A legacy (non-zip) torch.save file: magic, protocol, sys info, object, keys, data."""
    out = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    out += pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    out += P.whole(body) + pickle.dumps([k for k, _, _ in storages], protocol=2)
    for _, numel, raw in storages:
        out += struct.pack("<q", numel) + raw
    path.write_bytes(out)


def one_tensor(numel: int = 4, size: list[int] | None = None, **kw: object) -> bytes:
    return P.dict([(P.s("w"), P.tensor("0", numel, size or [2, 2], **kw))])  # type: ignore[arg-type]


def forge_zip_member_size(path: Path, member: str, size: int) -> None:
    """Rewrite a stored member's uncompressed size in its local and central headers."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    # (signature, offset of the name length, of the name, of the uncompressed size)
    for sig, len_at, name_at, size_at in ((b"PK\x03\x04", 26, 30, 22), (b"PK\x01\x02", 28, 46, 24)):
        at = data.find(sig)
        while at >= 0:
            n = struct.unpack_from("<H", data, at + len_at)[0]
            if bytes(data[at + name_at:at + name_at + n]) == name:
                struct.pack_into("<I", data, at + size_at, size)
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))


def quiet_save(obj: object, path: Path, **kw: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- safetensors


def safetensors_bytes(tensors: dict[str, np.ndarray | tuple[str, list[int], bytes]],
                      header_patch: Callable[[dict], None] | None = None, trailing: bytes = b"",
                      length_patch: int | None = None) -> bytes:
    """A safetensors file; entries are arrays or (dtype, shape, raw bytes)."""
    names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
             np.dtype("int8"): "I8", np.dtype("int64"): "I64", np.dtype("uint8"): "U8"}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, value in tensors.items():
        if isinstance(value, tuple):
            dtype, shape, raw = value
        else:
            little = value.astype(value.dtype.newbyteorder("<"))
            dtype, shape, raw = names[value.dtype], list(value.shape), little.tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if header_patch is not None:
        header_patch(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if length_patch is None else length_patch
    return struct.pack("<Q", n) + text + data + trailing


def bf16(values: list[float]) -> bytes:
    return torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()


# --------------------------------------------------------------------------- ONNX


def gemm_model(weights: list[np.ndarray], name: str = "g") -> onnx.ModelProto:
    """x -> Gemm(w0) -> Relu -> Gemm(w1) ...; weights as (out, in) with transB=1."""
    nodes, inits, prev = [], [], "x"
    for k, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        out = f"h{k}" if k < len(weights) - 1 else "y"
        nodes.append(helper.make_node("Gemm", [prev, f"w{k}"], [f"g{k}" if k < len(weights) - 1 else out],
                                      transB=1, name=f"gemm{k}"))
        if k < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [f"g{k}"], [out], name=f"relu{k}"))
        prev = out
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights[0].shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights[-1].shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_model(folder: Path, stem: str, patch: Callable[[dict[str, str]], None],
                   setup: Callable[[Path], None] | None = None) -> Path:
    """samples/mlp.onnx with its weights in '<stem>.bin', then each tensor's external
    data entries rewritten by ``patch``."""
    sub = folder / f"{stem}.dir"
    sub.mkdir()
    model = onnx.load(SAMPLES / "mlp.onnx")
    path = sub / f"{stem}.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{stem}.bin", size_threshold=0)
    if setup is not None:
        setup(sub)
    loaded = onnx.load(path, load_external_data=False)
    for init in loaded.graph.initializer:
        entries = {e.key: e.value for e in init.external_data}
        if not entries:
            continue
        patch(entries)
        del init.external_data[:]
        for key, value in entries.items():
            init.external_data.add(key=key, value=value)
    onnx.save(loaded, path)
    return path
