"""safetensors files, valid and broken: headers, dtypes, offsets, overlaps."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .forge import (
    safetensors_bytes,
)
from .registry import CASES, Case

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
