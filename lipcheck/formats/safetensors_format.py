"""safetensors files, parsed here with json and torch.frombuffer (no ``safetensors`` package).

Layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length N, N bytes of JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (plus an optional ``__metadata__`` of strings), then the
raw little-endian data; offsets are relative to the end of the header. As in the
reference implementation, the tensors must tile the data exactly: no gap, no overlap,
nothing after the last one, so a file can never make lipcheck read more than its size.
Everything is validated before a single data byte is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from . import SAFETENSORS_MAX_HEADER

READ_CHUNK_BYTES = 16 << 20  # read_float64 converts this many stored bytes at a time
# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
}


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A safetensors file as a mapping of its tensors, each read from the file when it is
    asked for (so a model larger than memory is analysed one tensor at a time). The whole
    header is validated when the file is opened, before any data is read."""

    def __init__(self, path: Path) -> None:
        if sys.byteorder != "little":  # the data is little-endian; frombuffer reads native order
            raise InputError(f"{path}: safetensors files are read on little-endian machines only")
        self.path = path
        with path.open("rb") as fh:
            self.size = os.fstat(fh.fileno()).st_size
            header_len, entries = _read_header(fh, self.size, path)
        self.data_start = 8 + header_len
        layout = _validate(entries, self.size - self.data_start, path)
        if not layout:
            raise InputError(f"{path}: the safetensors header describes no tensors")
        self.layout = {name: (dtype, shape, begin, end) for name, dtype, shape, begin, end in layout}

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.layout[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = bytearray(end - begin)  # read into place: one tensor-sized buffer, no bytes copy
        with self.path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size != self.size:
                raise InputError(f"{self.path} changed size while lipcheck read it")
            fh.seek(self.data_start + begin)
            got = fh.readinto(raw)
        if got != end - begin:  # the file shrank while being read
            raise InputError(f"{self.path}: tensor '{name}' is cut short (file truncated while reading)")
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)

    def read_float64(self, name: str) -> torch.Tensor | None:
        """A floating-point tensor widened to float64, converted from the file a chunk at a
        time (the stored bytes are never held whole beside the float64 copy); None for other
        dtypes (the caller reads them as stored)."""
        dtype, shape, begin, end = self.layout[name]
        if not dtype.is_floating_point:
            return None
        out = torch.empty(shape, dtype=torch.float64)
        flat = out.view(-1)
        itemsize = torch.empty((), dtype=dtype).element_size()
        step = max(1, READ_CHUNK_BYTES // itemsize) * itemsize
        buffer = bytearray(min(step, end - begin))
        done = 0  # elements converted
        with self.path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size != self.size:
                raise InputError(f"{self.path} changed size while lipcheck read it")
            fh.seek(self.data_start + begin)
            while begin + done * itemsize < end:
                want = min(step, end - begin - done * itemsize)
                view = memoryview(buffer)[:want]
                if fh.readinto(view) != want:
                    raise InputError(f"{self.path}: tensor '{name}' is cut short (file truncated while reading)")
                count = want // itemsize
                flat[done:done + count].copy_(torch.frombuffer(view, dtype=dtype))
                done += count
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __contains__(self, name: object) -> bool:
        return name in self.layout  # Mapping's default would read the tensor

    def __len__(self) -> int:
        return len(self.layout)

    def header(self, name: str) -> torch.Tensor:
        """A meta tensor of the stored shape and dtype (from the header: nothing read)."""
        dtype, shape, _, _ = self.layout[name]
        return torch.empty(shape, dtype=dtype, device="meta")


def load_safetensors(path: Path) -> SafetensorsFile:
    """The file's tensors, validated now and read lazily."""
    return SafetensorsFile(path)


def _read_header(fh: Any, size: int, path: Path) -> tuple[int, dict[str, Any]]:
    first = fh.read(8)
    if len(first) < 8:
        raise InputError(f"{path}: safetensors file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", first)
    if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
        raise InputError(f"{path}: safetensors header length {n} is beyond the file's {size} bytes")
    text = fh.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    return n, header


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a JSON object naming one key twice is refused (a header or an
    index that lists a tensor twice), not silently reduced to its last entry."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(entries: dict[str, Any], data_len: int,
              path: Path) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """Every entry well-formed, sized by its shape, and the entries tiling [0, data_len)."""
    layout = []
    for name, info in entries.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise InputError(f"{where}: expected an object with dtype, shape and data_offsets")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype_name not in DTYPES:
            raise InputError(f"{where}: unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InputError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise InputError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        dtype, itemsize = DTYPES[dtype_name]
        expected = math.prod(shape) * itemsize  # Python ints: no overflow
        if not 0 <= begin <= end <= data_len:
            raise InputError(f"{where}: data_offsets [{begin}, {end}] are outside the {data_len} data bytes")
        if end - begin != expected:
            raise InputError(
                f"{where}: {end - begin} data bytes but shape {shape} of {dtype_name} needs {expected}"
            )
        layout.append((name, dtype, tuple(shape), begin, end))
    position = 0
    for name, _, _, begin, end in sorted(layout, key=lambda e: (e[3], e[4])):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise InputError(f"{path}: tensor '{name}' {what}")
        position = end
    if position != data_len:
        raise InputError(f"{path}: {data_len - position} bytes after the last tensor are not described by the header")
    return layout
