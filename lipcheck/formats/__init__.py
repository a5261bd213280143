"""Model file formats: decide the format from the file's content, then load it.

Each adapter lives in its own module and is imported only when a file of its kind
is opened, so ``lipcheck --help`` never imports torch or onnx.
"""

from __future__ import annotations

import enum
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import onnx


class Format(str, enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    TORCH_SAVE = "torch-save"  # torch.save: a state_dict, checkpoint dict or pickled module
    TORCH_EXPORT = "torch-export"
    PICKLE = "pickle"  # a raw (non-torch) pickle


@dataclass
class Loaded:
    """What a loader hands to the analysis: a graph (ONNX), or bare tensors."""

    format: str
    onnx_model: onnx.ModelProto | None = None
    tensors: dict[str, Any] | None = None  # name -> torch.Tensor, for per-tensor analysis
    input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    why_no_graph: str = ""


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


def detect(path: Path) -> Format:
    """The format from the first bytes and, for zip archives, their member names."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a model file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise InputError(f"{path} is empty (0 bytes)")
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path} is a damaged zip archive: {exc}") from None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return Format.TORCHSCRIPT
        if any(n.endswith("archive_format") or "serialized_exported_program" in n for n in names):
            return Format.TORCH_EXPORT
        if any(n.endswith("data.pkl") for n in names):
            return Format.TORCH_SAVE
        raise InputError(f"{path} is a zip archive but not a torch file lipcheck knows")
    if head.startswith(PICKLE_PROTO):
        return Format.TORCH_SAVE  # torch.load reads legacy torch.save and plain pickles alike
    return Format.ONNX


def load(path: Path, *, trust: bool = False, input_shape: tuple[int, ...] | None = None) -> Loaded:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    fmt = detect(path)
    if fmt is Format.ONNX:
        from .onnx_format import load_onnx

        return Loaded(format=fmt.value, onnx_model=load_onnx(path), input_shape=input_shape)
    from . import torch_format

    return torch_format.load(path, fmt, trust=trust, input_shape=input_shape)
