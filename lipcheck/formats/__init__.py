"""Model file formats: decide the format from the file's content, then load it.

Each adapter lives in its own module and is imported only when a file of its kind
is opened, so ``lipcheck --help`` never imports torch or onnx. The extension is never
consulted: a safetensors file named ``.pt`` is read as safetensors, a pickle named
``.onnx`` goes through the pickle checks.
"""

from __future__ import annotations

import enum
import io
import os
import pickletools
import stat
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedInputError

if TYPE_CHECKING:
    import onnx

    from ..rewrite import Rewrite


class Format(str, enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    TORCH_SAVE = "torch-save"  # torch.save: a state_dict, checkpoint dict or pickled module
    TORCH_EXPORT = "torch-export"
    PICKLE = "pickle"  # a raw (non-torch) pickle
    SAFETENSORS = "safetensors"


class Kind(str, enum.Enum):
    """What a loaded model is, which decides how normalize writes it back; its value is the
    report's ``model.format``."""

    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch-export"
    SAFETENSORS = "safetensors"
    STATE_DICT = "state_dict"  # a torch.save state_dict or checkpoint dict of tensors
    PICKLED_MODULE = "pickled-module"  # torch.save(model)
    CHECKPOINT_MODULE = "checkpoint-module"  # a checkpoint dict holding a module
    MODULE = "module"  # an nn.Module handed to the API
    PARAMETRIZED = "lipcheck-parametrized"  # normalize --mode parametrize's output
    CHECKPOINT_FOLDER = "checkpoint-folder"  # a Hugging Face model folder, shards and index


@dataclass
class Loaded:
    """What a loader hands to the analysis: a graph (ONNX), or bare tensors."""

    format: Kind
    onnx_model: onnx.ModelProto | None = None
    tensors: Mapping[str, Any] | None = None  # name -> torch.Tensor (maybe read when asked for)
    input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    why_no_graph: str = ""
    config: dict[str, Any] | None = None  # a model folder's config.json


ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive
PICKLE_PROTO = b"\x80"
# torch.save's legacy (non-zip) format starts with a pickle of this number.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# The safetensors reference implementation refuses headers above 100 MB.
SAFETENSORS_MAX_HEADER = 100_000_000
HEAD_BYTES = 512
# What zipfile raises on a damaged archive (NotImplementedError: a "zip version" or
# compression method from the future; struct.error: a cut header).
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
              NotImplementedError, struct.error)

# Files lipcheck recognises in order to refuse them with a useful message.
FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TensorFlow .h5?); export the model to ONNX"),
    (0, b"GGUF", "a GGUF file (llama.cpp); lipcheck reads ONNX, torch and safetensors files"),
    (4, b"TFL3", "a TensorFlow Lite flatbuffer; convert the model to ONNX (tf2onnx)"),
    (0, b"\x93NUMPY", "a NumPy .npy array, not a model; save the weights as a safetensors file"),
    (0, b"\x1f\x8b", "gzip-compressed; decompress it first"),
    (0, b"BZh", "bzip2-compressed; decompress it first"),
    (0, b"\xfd7zXZ\x00", "xz-compressed; decompress it first"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive; extract it first"),
    (257, b"ustar", "a tar archive; extract it first"),
)


def detect(path: Path) -> Format:
    """The format from the first bytes and, for zip archives, their member names."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEAD_BYTES)
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a model file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise InputError(f"{path} is empty (0 bytes)")
    if head[:4] in ZIP_MAGICS:
        return _detect_zip(path)
    if _is_safetensors(head, size, path):
        return Format.SAFETENSORS
    for offset, magic, what in FOREIGN_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            raise UnsupportedInputError(f"{path} is {what}")
    if head.startswith(PICKLE_PROTO) or _looks_like_old_pickle(head):
        return Format.TORCH_SAVE if is_torch_legacy(head) else Format.PICKLE
    return Format.ONNX


def _detect_zip(path: Path) -> Format:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except ZIP_ERRORS as exc:
        raise InputError(f"{path} is a damaged or truncated zip archive: {exc}") from None
    if any(n.endswith("archive_format") or "serialized_exported_program" in n for n in names):
        return Format.TORCH_EXPORT
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return Format.TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return Format.TORCH_SAVE
    if names and all(n.endswith(".npy") for n in names):
        raise UnsupportedInputError(f"{path} is a NumPy .npz archive, not a model; save the weights as safetensors")
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") if names else "none"
    raise UnsupportedInputError(
        f"{path} is a zip archive but not a torch.save, TorchScript or torch.export file (members: {shown})"
    )


def _is_safetensors(head: bytes, size: int, path: Path) -> bool:
    """8-byte little-endian header length, then a JSON object: '{' at byte 8."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > SAFETENSORS_MAX_HEADER:
        return False  # not a plausible header length: some other format with '{' at byte 8
    if 8 + n > size:
        raise InputError(
            f"{path} looks like a safetensors file but its header length ({n} bytes) is beyond "
            f"the file's {size} bytes: truncated or damaged"
        )
    return True


def _looks_like_old_pickle(head: bytes) -> bool:
    """Protocol 0/1 pickles have no PROTO opcode; accept the usual first opcodes
    (MARK, EMPTY_DICT, EMPTY_LIST, GLOBAL) followed by a few more valid ones."""
    if head[:1] not in (b"(", b"}", b"]", b"c"):
        return False
    count = 0
    try:
        for _ in pickletools.genops(io.BytesIO(head)):
            count += 1
            if count >= 4:
                return True
    except Exception:  # noqa: BLE001 - genops raises ValueError and friends on non-pickles
        return False
    return count >= 2


def is_torch_legacy(head: bytes) -> bool:
    """True when the first pickle is exactly torch's legacy magic number (read statically:
    nothing is unpickled)."""
    ops = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            ops.append((op.name, arg))
            if op.name == "STOP" or len(ops) > 4:
                break
    except Exception:  # noqa: BLE001
        return False
    values = [arg for name, arg in ops if name not in ("PROTO", "FRAME", "STOP")]
    return ops[-1][0] == "STOP" and values == [TORCH_LEGACY_MAGIC]


NO_GRAPH_SHAPE = (
    "--input-shape needs a graph, and {what} holds weights only; give the architecture with "
    "--model package.module:factory --trust (it is built, the weights loaded strictly, and "
    "traced at that size), or analyse an ONNX or TorchScript export"
)


def load(path: Path, *, trust: bool = False, input_shape: tuple[int, ...] | None = None,
         architecture: str | None = None) -> Loaded:
    """Open ``path`` as what its content says it is. ``architecture`` (``--model``) builds
    the network for a file of weights only (state_dict, safetensors)."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    from .checkpoint_folder import is_checkpoint_path

    if is_checkpoint_path(path):
        from .checkpoint_folder import load_checkpoint_folder

        if input_shape is not None or architecture is not None:
            from ..errors import UsageError

            raise UsageError(f"{{param}} is not used for a model folder ({path}): its matrices are "
                             "reported one by one", param="input_shape" if input_shape else "architecture")
        return load_checkpoint_folder(path)
    if not stat.S_ISREG(mode):
        # A FIFO or device would block or never end; lipcheck reads regular files only.
        raise InputError(f"{path} is not a regular file (a pipe, socket or device)")
    fmt = detect(path)
    if architecture is not None and fmt in (Format.ONNX, Format.TORCHSCRIPT, Format.TORCH_EXPORT):
        from ..errors import UsageError

        raise UsageError(f"{{param}} is for files of weights only (state_dicts, safetensors); {path} "
                         f"is {fmt.value} and carries its own graph", param="architecture")
    if fmt is Format.ONNX:
        from .onnx_format import load_onnx

        return Loaded(format=Kind.ONNX, onnx_model=load_onnx(path, trust=trust), input_shape=input_shape)
    if fmt is Format.SAFETENSORS:
        from .safetensors_format import load_safetensors

        tensors = load_safetensors(path)
        if architecture is not None:
            from .. import architecture as arch
            from .module_export import from_module

            module = arch.build(architecture, trust=trust)
            arch.load_weights(module, tensors, architecture, path)
            return from_module(module, Kind.SAFETENSORS, input_shape)
        if input_shape is not None:
            from ..errors import UsageError

            raise UsageError(NO_GRAPH_SHAPE.format(what=f"the safetensors file {path}"))
        loaded = Loaded(format=Kind.SAFETENSORS, tensors=tensors, input_shape=input_shape)
        loaded.why_no_graph = (
            "a safetensors file has weights but no graph, so no network bound can be composed; "
            "analyse the ONNX or TorchScript form (with --input-shape) for one"
        )
        return loaded
    from . import torch_format

    return torch_format.load(path, fmt, trust=trust, input_shape=input_shape, architecture=architecture)


def save_scaled(loaded: Loaded, source: Path, output: Path, rewrite: Rewrite, *, trust: bool) -> None:
    """Write ``source`` to ``output`` in its own format with ``rewrite`` applied (normalize's
    bake mode). Nothing is written when the rewrite cannot be carried out."""
    if loaded.format is Kind.ONNX:
        from .onnx_write import save_scaled as save_onnx

        assert loaded.onnx_model is not None
        save_onnx(loaded.onnx_model, output, rewrite, source)
        return
    if loaded.format in (Kind.TORCHSCRIPT, Kind.PICKLED_MODULE, Kind.CHECKPOINT_MODULE, Kind.STATE_DICT):
        from .torch_write import save_scaled as save_torch

        save_torch(loaded.format, source, output, rewrite, trust)
        return
    if loaded.format is Kind.SAFETENSORS and loaded.tensors is not None:
        from .safetensors_write import save_safetensors

        save_safetensors(source, output, rewrite)
        return
    if loaded.format is Kind.CHECKPOINT_FOLDER and loaded.tensors is not None:
        from .safetensors_write import save_folder

        save_folder(loaded.tensors, source, output, rewrite, force=True)
        return
    from ..errors import UsageError

    raise UsageError(f"normalize cannot write the {loaded.format.value} format yet (ONNX, TorchScript, "
                     "torch.save checkpoints, pickled modules, safetensors files and model folders of "
                     "safetensors shards are supported)")
