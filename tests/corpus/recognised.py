"""Files lipcheck recognises but does not analyse (HDF5, GGUF, gzip, .npy, plain zip),
and valid models with a misleading name."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .forge import (
    SAMPLES,
    gemm_model,
    quiet_save,
)
from .registry import CASES, Case, case


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
