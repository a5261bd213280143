"""A corpus of hostile, broken, mislabelled and odd model files, written into a folder.

Every payload is harmless: if it ever ran, it would only create the file
``MARKER_NAME`` in the corpus folder (via ``open(marker, 'w')``, ``os.system('touch ...')``
or TorchScript's ``torch.from_file``), which the tests then look for.

``build_corpus(folder)`` writes every case and returns ``{name: path}``; ``CASES`` says
what lipcheck must answer for each: ``kind`` is ``untrusted`` / ``broken`` /
``unsupported`` (exit 2, one line naming ``fragment``) or ``ok`` (exit 0, ``fragment`` in
the JSON). Torch pickles are assembled opcode by opcode (``_Pickle``) so that sizes,
shapes and globals can be forged without importing or calling anything.

Run it as a script to write the corpus somewhere and look at it::

    python tests/make_hostile_corpus.py /tmp/corpus
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
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
    local = data.find(b"PK\x03\x04")
    while local >= 0:
        n = struct.unpack_from("<H", data, local + 26)[0]
        if bytes(data[local + 30:local + 30 + n]) == name:
            struct.pack_into("<I", data, local + 22, size)
        local = data.find(b"PK\x03\x04", local + 4)
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        n = struct.unpack_from("<H", data, central + 28)[0]
        if bytes(data[central + 46:central + 46 + n]) == name:
            struct.pack_into("<I", data, central + 24, size)
        central = data.find(b"PK\x01\x02", central + 4)
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


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str  # file name in the corpus folder (its extension is often a lie)
    kind: str  # untrusted | broken | unsupported | ok
    fragment: str  # expected in the error line (exit 2), or in the JSON report (exit 0)
    build: Callable[[Path, Path], Path | None]  # (path, marker) -> writes it; may return another path
    args: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 0 if self.kind == "ok" else 2


CASES: list[Case] = []


def case(name: str, kind: str, fragment: str, args: tuple[str, ...] = ()) -> Callable:  # type: ignore[type-arg]
    def register(fn: Callable[[Path, Path], Path | None]) -> Callable[[Path, Path], Path | None]:
        CASES.append(Case(name, kind, fragment, fn, args))
        return fn

    return register


# ---- code that must never run


@case("zip_reduce_open.pt", "untrusted", "open")
def _zip_open(p: Path, marker: Path) -> None:
    quiet_save({"w": torch.ones(2, 2), "x": OpenPayload(marker)}, p)


@case("zip_reduce_system.pt", "untrusted", "system")
def _zip_system(p: Path, marker: Path) -> None:
    quiet_save({"w": torch.ones(2, 2), "x": SystemPayload(marker)}, p)


@case("zip_reduce_protocol4.pt", "untrusted", "system")
def _zip_proto4(p: Path, marker: Path) -> None:
    quiet_save({"w": torch.ones(2, 2), "x": SystemPayload(marker)}, p, pickle_protocol=4)


@case("legacy_reduce.pt", "untrusted", "system")
def _legacy_system(p: Path, marker: Path) -> None:
    quiet_save({"w": torch.ones(2, 2), "x": SystemPayload(marker)}, p, _use_new_zipfile_serialization=False)


@case("raw_pickle_reduce.pkl", "untrusted", "plain Python pickle")
def _raw_open(p: Path, marker: Path) -> None:
    p.write_bytes(pickle.dumps({"x": OpenPayload(marker)}, protocol=4))


@case("raw_pickle_protocol0.pt", "untrusted", "system")
def _raw_p0(p: Path, marker: Path) -> None:
    p.write_bytes(pickle.dumps([SystemPayload(marker)], protocol=0))


@case("raw_pickle_named.onnx", "untrusted", "system")
def _raw_onnx(p: Path, marker: Path) -> None:
    p.write_bytes(pickle.dumps(SystemPayload(marker), protocol=2))


@case("raw_pickle_tensors.pkl", "untrusted", "--trust")
def _raw_tensors(p: Path, marker: Path) -> None:
    p.write_bytes(pickle.dumps({"w": torch.ones(2, 2)}, protocol=4))


@case("pt2_payload.pt2", "untrusted", "torch.export")
def _pt2(p: Path, marker: Path) -> None:
    payload = pickle.dumps(SystemPayload(marker), protocol=2)
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("model/archive_format", "pt2")
        zf.writestr("model/archive_version", "0")
        zf.writestr("model/models/model.json", "{}")
        zf.writestr("model/data/sample_inputs/model.pt", payload)
        zf.writestr("model/data/constants/model.pkl", payload)


@case("pt2_named.onnx", "untrusted", "torch.export")
def _pt2_named(p: Path, marker: Path) -> None:
    _pt2(p, marker)


@case("ckpt_namespace.pt", "untrusted", "argparse.Namespace")
def _namespace(p: Path, marker: Path) -> None:
    quiet_save({"state_dict": {"w": torch.ones(2, 2)}, "args": argparse.Namespace(lr=0.1)}, p)


@case("ckpt_numpy_scalar.pt", "untrusted", "scalar")
def _np_scalar(p: Path, marker: Path) -> None:
    quiet_save({"state_dict": {"w": torch.ones(2, 2)}, "epoch": np.int64(3)}, p)


@case("ckpt_numpy_array.pt", "untrusted", "numpy")
def _np_array(p: Path, marker: Path) -> None:
    quiet_save({"state_dict": {"w": torch.ones(2, 2)}, "mean": np.ones(3)}, p)


@case("ckpt_numpy_legacy.pt", "untrusted", "numpy")
def _np_legacy(p: Path, marker: Path) -> None:
    quiet_save({"state_dict": {"w": torch.ones(2, 2)}, "epoch": np.float32(3)}, p,
               _use_new_zipfile_serialization=False)


@case("pickled_module.pt", "untrusted", "torch.nn.modules.linear.Linear")
def _module(p: Path, marker: Path) -> None:
    quiet_save(torch.nn.Linear(2, 2), p)


@case("torchscript_python_global.pt", "untrusted", "posix.system")
def _ts_global(p: Path, marker: Path) -> None:
    body = P.call(P.g("posix", "system"), P.tup(P.s(f"touch '{marker}'")))
    torch_zip(p, body, {}, extra={"constants.pkl": P.whole(b")"), "code/__torch__/m.py": b""})


class _FromFileOnLoad(torch.nn.Module):
    """TorchScript whose __setstate__ (run by torch.jit.load) and forward create a file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.diag(torch.tensor([3.0, 1.0])))
        self.path = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=4)
        return x @ self.weight + t.sum() * 0

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.path = state[1]
        t = torch.from_file(self.path, shared=True, size=4)
        self.weight = state[0] + t.sum() * 0
        self.training = state[2]


@case("torchscript_setstate.pt", "ok", '"sigma_upper"')
def _ts_setstate(p: Path, marker: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_FromFileOnLoad(str(marker))), str(p))
    if marker.exists():  # scripting must not have created it; make sure the test starts clean
        marker.unlink()


# ---- broken files


@case("empty.onnx", "broken", "empty")
def _empty(p: Path, marker: Path) -> None:
    p.write_bytes(b"")


@case("random.onnx", "broken", "not a model file")
def _random(p: Path, marker: Path) -> None:
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


@case("random.pt", "broken", "")
def _random_pt(p: Path, marker: Path) -> None:
    p.write_bytes(np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes())


@case("zeros.pt", "broken", "")
def _zeros(p: Path, marker: Path) -> None:
    p.write_bytes(b"\x00" * 256)


@case("text.onnx", "broken", "")
def _text(p: Path, marker: Path) -> None:
    p.write_text("this is not a model\n" * 20)


@case("pickle_garbage.pt", "broken", "pickle")
def _pickle_garbage(p: Path, marker: Path) -> None:
    p.write_bytes(b"\x80\x04\xff\xfe garbage that is not a pickle")


@case("directory.onnx", "broken", "directory")
def _directory(p: Path, marker: Path) -> None:
    p.mkdir()


@case("fifo.onnx", "broken", "regular file")
def _fifo(p: Path, marker: Path) -> None:
    os.mkfifo(p)


@case("truncated_zip.pt", "broken", "zip")
def _trunc_zip(p: Path, marker: Path) -> None:
    data = (SAMPLES / "cnn.state_dict.pt").read_bytes()
    p.write_bytes(data[: len(data) // 2])


@case("truncated_zip_tail.pt", "broken", "")
def _trunc_zip_tail(p: Path, marker: Path) -> None:
    data = (SAMPLES / "mlp.state_dict.pt").read_bytes()
    p.write_bytes(data[:-30])


@case("truncated_protobuf.onnx", "broken", "")
def _trunc_onnx(p: Path, marker: Path) -> None:
    data = (SAMPLES / "cnn.onnx").read_bytes()
    p.write_bytes(data[: len(data) // 2])


@case("truncated_torchscript.pt", "broken", "zip")
def _trunc_ts(p: Path, marker: Path) -> None:
    data = (SAMPLES / "mlp.ts.pt").read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])


@case("zip_no_data_record.pt", "broken", "data/0")
def _no_record(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(), {})


@case("zip_storage_short.pt", "broken", "")
def _short(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(), {"0": FOUR_FLOATS[:8]})


@case("zip_shape_beyond_storage.pt", "broken", "")
def _shape_big(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(4, [100000, 100000]), {"0": FOUR_FLOATS})


@case("zip_numel_beyond_file.pt", "broken", "")
def _numel_big(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(10**12, [10**6, 10**6]), {"0": FOUR_FLOATS})


@case("zip_offset_beyond_storage.pt", "broken", "")
def _offset_big(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(4, [2, 2], offset=10**15), {"0": FOUR_FLOATS})


@case("zip_negative_shape.pt", "broken", "")
def _neg_shape(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(4, [-2, 2]), {"0": FOUR_FLOATS})


@case("zip_forged_member_size.pt", "broken", "forged")
def _forged_member(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(10**9, [10**9]), {"0": FOUR_FLOATS})
    forge_zip_member_size(p, "archive/data/0", 4 * 10**9)


@case("zip_future_version.pt", "broken", "zip")
def _future_version(p: Path, marker: Path) -> None:
    data = bytearray((SAMPLES / "mlp.state_dict.pt").read_bytes())
    data[data.find(b"PK\x01\x02") + 6] = 0x9A  # "version needed to extract": 15.4
    p.write_bytes(bytes(data))


@case("legacy_numel_beyond_file.pt", "broken", "declares")
def _legacy_numel(p: Path, marker: Path) -> None:
    torch_legacy(p, one_tensor(10**12, [2, 2], legacy=True), [("0", 10**12, FOUR_FLOATS)])


@case("legacy_numel_4g.pt", "broken", "declares")
def _legacy_numel_4g(p: Path, marker: Path) -> None:
    torch_legacy(p, one_tensor(4 * 10**9, [2, 2], legacy=True), [("0", 4 * 10**9, FOUR_FLOATS)])


@case("legacy_storage_short.pt", "broken", "")
def _legacy_short(p: Path, marker: Path) -> None:
    torch_legacy(p, one_tensor(4, [2, 2], legacy=True), [("0", 4, FOUR_FLOATS[:8])])


@case("legacy_truncated.pt", "broken", "")
def _legacy_trunc(p: Path, marker: Path) -> None:
    buf = io.BytesIO()
    quiet_save({"w": torch.ones(8, 8)}, buf, _use_new_zipfile_serialization=False)
    p.write_bytes(buf.getvalue()[:-100])


@case("onnx_dims_beyond_data.onnx", "broken", "needs")
def _onnx_forged(p: Path, marker: Path) -> None:
    model = gemm_model([np.eye(4, dtype=np.float32)])
    init = model.graph.initializer[0]
    del init.dims[:]
    init.dims.extend([100000, 100000])
    onnx.save(model, p)


@case("onnx_constant_dims_beyond_data.onnx", "broken", "needs")
def _onnx_const_forged(p: Path, marker: Path) -> None:
    value = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    del value.dims[:]
    value.dims.extend([65536, 65536, 16])
    nodes = [helper.make_node("Constant", [], ["w"], value=value),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), p)


@case("onnx_negative_dims.onnx", "broken", "negative")
def _onnx_neg(p: Path, marker: Path) -> None:
    model = gemm_model([np.eye(4, dtype=np.float32)])
    model.graph.initializer[0].dims[0] = -4
    onnx.save(model, p)


@case("onnx_unknown_dtype.onnx", "broken", "data type")
def _onnx_dtype(p: Path, marker: Path) -> None:
    model = gemm_model([np.eye(4, dtype=np.float32)])
    model.graph.initializer[0].data_type = 97
    onnx.save(model, p)


@case("onnx_no_nodes.onnx", "broken", "no nodes")
def _onnx_empty_graph(p: Path, marker: Path) -> None:
    graph = helper.make_graph([], "g", [], [])
    onnx.save(helper.make_model(graph), p)


def _ext(patch: Callable[[dict[str, str]], None], setup: Callable[[Path], None] | None = None
         ) -> Callable[[Path, Path], Path]:
    def build(p: Path, marker: Path) -> Path:
        return external_model(p.parent, p.stem, patch, setup)

    return build


def _set(**values: str) -> Callable[[dict[str, str]], None]:
    return lambda entries: entries.update(values)


EXTERNAL_CASES = [
    ("ext_absolute", "relative", _set(location="/etc/passwd"), None),
    ("ext_dotdot", "'..'", _set(location="../outside.bin"), None),
    ("ext_symlink", "symlink", _set(location="link.bin"),
     lambda d: (d / "link.bin").symlink_to(d / "ext_symlink.bin")),
    ("ext_symlinked_dir", "symlink", _set(location="sub/ext_symlinked_dir.bin"),
     lambda d: (d / "sub").symlink_to(d)),
    ("ext_missing", "not found", _set(location="missing.bin"), None),
    ("ext_directory", "regular file", _set(location="adir"), lambda d: (d / "adir").mkdir()),
    ("ext_offset_beyond", "beyond", _set(offset="999999999"), None),
    ("ext_bad_offset", "integer", _set(offset="12abc"), None),
    ("ext_negative_length", "integer", _set(length="-16"), None),
    ("ext_length_mismatch", "does not match", lambda e: e.update(length=str(int(e.get("length", "0")) - 4)),
     None),
    ("ext_overlap", "overlap", _set(offset="0"), None),
    ("ext_nul", "usable", _set(location="a\x00b.bin"), None),
]
for _stem, _fragment, _patch, _setup in EXTERNAL_CASES:
    CASES.append(Case(f"{_stem}.onnx", "broken", _fragment, _ext(_patch, _setup)))


# ---- safetensors, valid and broken

GOOD_ST = {"fc.weight": np.diag([3.0, -2.0, 1.0]).astype(np.float32), "fc.bias": np.zeros(3, np.float32)}


def _st(**kw: object) -> Callable[[Path, Path], None]:
    def build(p: Path, marker: Path) -> None:
        p.write_bytes(safetensors_bytes(dict(GOOD_ST), **kw))  # type: ignore[arg-type]

    return build


def _patch_entry(**fields: object) -> Callable[[dict], None]:
    return lambda header: header["fc.weight"].update(fields)


SAFETENSORS_CASES = [
    ("st_valid.safetensors", "ok", '"safetensors"', _st()),
    ("st_named.pt", "ok", '"safetensors"', _st()),
    ("st_header_beyond_file.safetensors", "broken", "header length", _st(length_patch=10**6)),
    # A length no safetensors writer produces: not taken for safetensors at all.
    ("st_header_huge.safetensors", "broken", "not a model file", _st(length_patch=2**62)),
    ("st_bad_json.safetensors", "broken", "JSON",
     lambda p, m: p.write_bytes(struct.pack("<Q", 16) + b'{"a": [1, 2,,]} ' + b"\x00" * 8)),
    ("st_no_tensors.safetensors", "broken", "no tensors",
     lambda p, m: p.write_bytes(struct.pack("<Q", 8) + b"{}      ")),
    ("st_header_extra_data.safetensors", "broken", "JSON",
     lambda p, m: p.write_bytes(struct.pack("<Q", 8) + b"{} [1]  ")),
    ("st_unknown_dtype.safetensors", "broken", "dtype", _st(header_patch=_patch_entry(dtype="F128"))),
    ("st_offsets_outside.safetensors", "broken", "outside", _st(header_patch=_patch_entry(data_offsets=[0, 10**12]))),
    ("st_size_mismatch.safetensors", "broken", "needs", _st(header_patch=_patch_entry(shape=[300000, 300000]))),
    ("st_negative_shape.safetensors", "broken", "non-negative", _st(header_patch=_patch_entry(shape=[-3, -3]))),
    ("st_overlap.safetensors", "broken", "overlaps",
     _st(header_patch=lambda h: h["fc.bias"].update(data_offsets=[0, 12]))),
    ("st_trailing.safetensors", "broken", "after the last", _st(trailing=b"\x00" * 16)),
    ("st_truncated.safetensors", "broken", "",
     lambda p, m: p.write_bytes(safetensors_bytes(dict(GOOD_ST))[:-10])),
    ("st_duplicate_key.safetensors", "broken", "duplicate",
     lambda p, m: p.write_bytes(struct.pack("<Q", 32) + b'{"a": {"dtype": "F32"}, "a": {}}')),
]
for _name, _kind, _fragment, _build in SAFETENSORS_CASES:
    CASES.append(Case(_name, _kind, _fragment, _build))


# ---- recognised, not analysed


@case("hdf5.pt", "unsupported", "HDF5")
def _hdf5(p: Path, marker: Path) -> None:
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)


@case("gguf.onnx", "unsupported", "GGUF")
def _gguf(p: Path, marker: Path) -> None:
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 100)


@case("gzipped_state_dict.pt", "unsupported", "gzip")
def _gzip(p: Path, marker: Path) -> None:
    import gzip

    p.write_bytes(gzip.compress((SAMPLES / "mlp.state_dict.pt").read_bytes()))


@case("numpy_array.pt", "unsupported", "NumPy")
def _npy(p: Path, marker: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.eye(3))
    p.write_bytes(buf.getvalue())


@case("plain_zip.onnx", "unsupported", "zip archive")
def _plain_zip(p: Path, marker: Path) -> None:
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("README.txt", "hello")


# ---- mislabelled but valid


def _copy(sample: str) -> Callable[[Path, Path], None]:
    return lambda p, m: p.write_bytes((SAMPLES / sample).read_bytes())


for _name, _sample, _fmt in [
    ("state_dict_named.onnx", "mlp.state_dict.pt", '"state_dict"'),
    ("onnx_named.pt", "mlp.onnx", '"onnx"'),
    ("torchscript_named.onnx", "mlp.ts.pt", '"torchscript"'),
]:
    CASES.append(Case(_name, "ok", _fmt, _copy(_sample)))


@case("onnx_brace_at_byte8.onnx", "ok", '"onnx"')
def _onnx_brace(p: Path, marker: Path) -> None:
    """A valid ONNX file whose byte 8 is '{', as a safetensors header would start."""
    model = gemm_model([np.eye(3, dtype=np.float32)])
    model.producer_name = "abcd{xyz"
    p.write_bytes(model.SerializeToString())


@case("legacy_state_dict.bin", "ok", '"state_dict"')
def _legacy_ok(p: Path, marker: Path) -> None:
    sd = torch.load(SAMPLES / "mlp.state_dict.pt", weights_only=True)
    quiet_save(sd, p, _use_new_zipfile_serialization=False)


# ---- odd but valid weights

ODD_KEYS = ("nan.weight", "inf.weight", "empty.weight", "scalar", "norm.weight", "conv3d.weight",
            "half.weight", "bf16.weight", "int8.weight", "quant.weight", "sparse.weight",
            "complex.weight", "six_d.weight", "bn.weight", "bn.running_var", "f8.weight", "zero_conv.weight")


def odd_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "nan.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        "inf.weight": torch.full((2, 2, 3, 3), float("inf")),
        "empty.weight": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "norm.weight": torch.ones(4),
        "conv3d.weight": torch.randn(2, 3, 2, 2, 2, generator=g),
        "half.weight": torch.diag(torch.tensor([3.0, 1.0])).half(),
        "bf16.weight": torch.diag(torch.tensor([2.0, 1.0])).bfloat16(),
        "int8.weight": torch.ones(3, 3, dtype=torch.int8),
        "quant.weight": torch.quantize_per_tensor(torch.diag(torch.tensor([4.0, 1.0])), 0.5, 0, torch.qint8),
        "sparse.weight": torch.eye(3).to_sparse(),
        "complex.weight": torch.eye(2, dtype=torch.complex64),
        "six_d.weight": torch.ones(1, 1, 1, 1, 1, 1),
        "bn.weight": torch.ones(4),
        "bn.running_var": torch.ones(3),  # does not match bn.weight: not a BatchNorm pair
        "f8.weight": torch.eye(2).to(torch.float8_e4m3fn),
        "zero_conv.weight": torch.zeros(0, 3, 3, 3),
    }


@case("odd_weights.pt", "ok", '"nan"')
def _odd(p: Path, marker: Path) -> None:
    quiet_save(odd_state_dict(), p)


@case("odd_weights_legacy.pt", "ok", '"bf16"')
def _odd_legacy(p: Path, marker: Path) -> None:
    # The legacy format cannot hold sparse, quantized or float8 tensors.
    sd = {k: v for k, v in odd_state_dict().items() if k not in ("sparse.weight", "quant.weight", "f8.weight")}
    quiet_save(sd, p, _use_new_zipfile_serialization=False)


@case("odd_weights.safetensors", "ok", '"half"')
def _odd_st(p: Path, marker: Path) -> None:
    p.write_bytes(safetensors_bytes({
        "half.weight": np.diag([3.0, 1.0]).astype(np.float16),
        "bf16.weight": ("BF16", [2, 2], bf16([2.0, 0.0, 0.0, 1.0])),
        "int8.weight": np.ones((2, 2), np.int8),
        "nan.weight": np.array([[np.nan, 1.0]], np.float32),
        "empty.weight": np.zeros((0, 3), np.float32),
        "scalar": np.array(1.5, np.float64),
        "conv.weight": np.ones((2, 1, 3, 3), np.float32),
    }))


@case("odd_checkpoint.pt", "ok", "int_keys")
def _odd_ckpt(p: Path, marker: Path) -> None:
    quiet_save({"epoch": 3, "int_keys": {0: torch.eye(2), 1: torch.eye(3)},
                "layers": [torch.eye(2), {"w": torch.eye(4)}], "name": "x"}, p)


@case("bare_tensor.pt", "ok", '"tensor"')
def _bare_tensor(p: Path, marker: Path) -> None:
    quiet_save(torch.diag(torch.tensor([2.0, 1.0])), p)


@case("onnx_nan_weight.onnx", "ok", "not finite")
def _onnx_nan(p: Path, marker: Path) -> None:
    w = np.eye(4, dtype=np.float32)
    w[1, 2] = np.nan
    onnx.save(gemm_model([w, np.eye(4, dtype=np.float32)]), p)


@case("onnx_inf_weight.onnx", "ok", "not finite")
def _onnx_inf(p: Path, marker: Path) -> None:
    w = np.eye(4, dtype=np.float32)
    w[0, 0] = np.inf
    onnx.save(gemm_model([np.eye(4, dtype=np.float32), w]), p)


@case("onnx_float16.onnx", "ok", '"Gemm"')
def _onnx_f16(p: Path, marker: Path) -> None:
    w = np.diag([3.0, 1.0, 1.0, 1.0]).astype(np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("Gemm", ["xh", "w"], ["yh"], transB=1, name="gemm"),
             helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), p)


@case("onnx_int8_dequantize.onnx", "ok", '"layers"')
def _onnx_int8(p: Path, marker: Path) -> None:
    wq = np.diag([100, 50, 20, 10]).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"], name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")]
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.float32(0.1), "scale"),
             numpy_helper.from_array(np.int8(0), "zp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), p)


@case("onnx_zero_size.onnx", "ok", '"layers"')
def _onnx_zero(p: Path, marker: Path) -> None:
    onnx.save(gemm_model([np.zeros((0, 4), np.float32)]), p)


# --------------------------------------------------------------------------- entry points


def build_case(folder: Path, c: Case) -> Path:
    """Write one case into ``folder``; returns the path to hand to lipcheck."""
    path = folder / c.name
    other = c.build(path, folder / MARKER_NAME)
    return other if isinstance(other, Path) else path


def build_corpus(folder: Path) -> dict[str, Path]:
    """Write every case into ``folder`` (which should be empty); {case name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    return {c.name: build_case(folder, c) for c in CASES}


def listing(folder: Path) -> set[str]:
    """Every path under ``folder`` (relative), symlinks not followed."""
    out = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            out.add(str(Path(root, name).relative_to(folder)))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    paths = build_corpus(target)
    width = max(len(n) for n in paths)
    by_name = {c.name: c for c in CASES}
    for name, path in paths.items():
        print(f"{name:{width}}  {by_name[name].kind:11}  {path}")
