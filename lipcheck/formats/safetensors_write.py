"""Writing safetensors files and Hugging Face model folders back with rescaled matrices
(normalize's writer for weight-only checkpoints).

A rescaled tensor keeps its dtype and shape, so it keeps its byte size: the header (names,
order, dtypes, offsets, ``__metadata__``) is copied byte for byte, every other tensor's bytes
are copied unchanged, and each selected matrix is written over its own offsets, one tensor
at a time (a model larger than memory is never held whole).

Rounding: a matrix scaled in float64 and rounded to its dtype (bf16 keeps 8 significant
bits) can have a spectral norm up to about 2^-8 relative above the float64 value. Each
selected matrix with a cap is therefore re-measured *as stored* (the rounded tensor, widened
to float64, through the Cholesky certificate) and scaled down again until its certified
norm is at or under the cap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError, UsageError
from ..files import atomic_writer
from ..rewrite import Rewrite
from .safetensors_format import SafetensorsFile

SLICE = re.compile(r"^(?P<key>.+)\[(?P<index>\d+)\]$")
COPY_CHUNK = 64 << 20
MAX_RESCALES = 16


def split_key(name: str) -> tuple[str, int | None]:
    """``"w[3]"`` -> ("w", 3) (one expert of a fused ``[E, out, in]`` tensor); else (name, None)."""
    m = SLICE.match(name)
    return (m.group("key"), int(m.group("index"))) if m else (name, None)


def _stored(w64: torch.Tensor, scale: float, dtype: torch.dtype, cap: float | None,
            where: str, estimate: float | None = None) -> torch.Tensor:
    """``w64 * scale`` rounded to ``dtype``, scaled down again while the rounded matrix's
    certified norm is above ``cap``."""
    from ..spectral.certify import gram_upper_bound

    s = scale
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    for _ in range(MAX_RESCALES):
        out = (w64 * s).to(dtype)
        if cap is None:
            return out
        # a slightly low first candidate (the estimate moves with the scale, rounding aside)
        first = estimate * s * (1 - 4 * eps) if estimate else 0.0
        bound = gram_upper_bound(out.to(torch.float64), first).value
        if bound <= cap:
            return out
        s *= cap / bound * (1 - 2 * eps)
    raise InputError(f"{where}: cannot round the rescaled matrix to {dtype} with its norm at or under {cap:.6g}")


def scaled_tensors(tensors: Mapping[str, torch.Tensor], rewrite: Rewrite) -> dict[str, dict[int | None, float]]:
    """Stored tensor -> {expert index or None: factor}, every name checked against ``tensors``."""
    todo: dict[str, dict[int | None, float]] = {}
    for name, s in rewrite.tensor_scales(tensors).items():
        key, index = split_key(name)
        if name in tensors:
            key, index = name, None
        if key not in tensors:
            raise InputError(f"weight not found in the file: {name}")
        todo.setdefault(key, {})[index] = s
    return todo


def _new_tensor(key: str, t: torch.Tensor, parts: dict[int | None, float], rewrite: Rewrite,
                where: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise InputError(f"{where}: tensor '{key}' is {t.dtype}, not a float weight: it cannot be rescaled")
    w64 = t.to(torch.float64)
    if None in parts:
        return _stored(w64, parts[None], t.dtype, rewrite.caps.get(key), f"{where}: {key}",
                       rewrite.estimates.get(key))
    out = t.clone()
    for index, s in parts.items():
        assert index is not None
        if not 0 <= index < t.shape[0]:
            raise InputError(f"{where}: {key}[{index}] is outside its {t.shape[0]} experts")
        name = f"{key}[{index}]"
        out[index] = _stored(w64[index], s, t.dtype, rewrite.caps.get(name), f"{where}: {name}",
                             rewrite.estimates.get(name))
    return out


def _write_file(src: SafetensorsFile, fh: object, rewrite: Rewrite,
                todo: dict[str, dict[int | None, float]]) -> None:
    """Copy ``src`` into the open file ``fh``, then write each rescaled tensor over its bytes."""
    assert hasattr(fh, "write") and hasattr(fh, "seek")
    with src.path.open("rb") as inp:
        while chunk := inp.read(COPY_CHUNK):
            fh.write(chunk)
    for key, parts in todo.items():
        _, _, begin, end = src.layout[key]
        new = _new_tensor(key, src[key], parts, rewrite, str(src.path)).contiguous()
        raw = new.view(torch.uint8).numpy().tobytes() if new.numel() else b""
        assert len(raw) == end - begin
        fh.seek(src.data_start + begin)
        fh.write(raw)


def save_safetensors(source: Path, output: Path, rewrite: Rewrite) -> None:
    """``source`` rewritten to ``output`` (a sibling temp file, renamed at the end)."""
    src = SafetensorsFile(source)
    todo = scaled_tensors(src, rewrite)
    with atomic_writer(output) as fh:
        _write_file(src, fh, rewrite, todo)


def save_folder(loaded_tensors: Mapping[str, torch.Tensor], source: Path, output: Path,
                rewrite: Rewrite, *, force: bool) -> None:
    """A model folder rewritten to the folder ``output``: every file copied, each shard that
    holds a rescaled matrix written again with the same name and layout, a fresh index."""
    from .checkpoint_folder import INDEX_NAMES, ShardedTensors

    folder = source if source.is_dir() else source.parent
    assert isinstance(loaded_tensors, ShardedTensors)
    todo = scaled_tensors(loaded_tensors, rewrite)
    by_shard: dict[int, tuple[Mapping[str, torch.Tensor], dict[str, dict[int | None, float]]]] = {}
    for key, parts in todo.items():
        shard = loaded_tensors.where[key]
        by_shard.setdefault(id(shard), (shard, {}))[1][key] = parts
    bin_names = _bin_shard_names(folder, source, by_shard)
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {output}: folder {parent} does not exist")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".lipcheck-tmp", dir=parent))
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        shutil.copytree(folder, tmp, symlinks=True, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n.endswith(".lipcheck-tmp")])
        for shard_id, (shard, keys) in by_shard.items():
            if isinstance(shard, SafetensorsFile):
                rel = shard.path.resolve().relative_to(folder.resolve())
                with (tmp / rel).open("r+b") as fh:
                    _write_file(shard, fh, rewrite, keys)
            else:
                _write_bin(folder / bin_names[shard_id], tmp / bin_names[shard_id], rewrite, keys)
        for name in INDEX_NAMES:
            if (folder / name).is_file():
                _fresh_index(folder / name, tmp / name, loaded_tensors)
        os.chmod(tmp, 0o777 & ~_umask())
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", suffix=".lipcheck-tmp", dir=parent))
            os.replace(output, old / "x")
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _bin_shard_names(folder: Path, source: Path,
                     by_shard: Mapping[int, tuple[Mapping[str, torch.Tensor], dict[str, dict[int | None, float]]]]
                     ) -> dict[int, str]:
    """The file name of each ``.bin`` shard that holds a rescaled tensor (from the index, or
    the folder's single ``pytorch_model.bin``)."""
    from .checkpoint_folder import read_index

    index = source if source.name.endswith(".index.json") else folder / "pytorch_model.bin.index.json"
    weight_map = read_index(index) if index.is_file() else {}
    out = {}
    for shard_id, (shard, keys) in by_shard.items():
        if isinstance(shard, SafetensorsFile):
            continue
        name = weight_map.get(next(iter(keys)), "pytorch_model.bin")
        if not (folder / name).is_file():
            raise UsageError(f"cannot find the .bin shard holding {next(iter(keys))} in {folder}")
        out[shard_id] = name
    return out


def _write_bin(source: Path, output: Path, rewrite: Rewrite, keys: dict[str, dict[int | None, float]]) -> None:
    """A ``.bin`` shard written again with ``torch.save``: the same dict, keys in the same
    order, every other tensor as it was (read memory-mapped)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    for key, parts in keys.items():
        match = [k for k in obj if str(k) == key]
        if len(match) != 1:
            raise InputError(f"{source}: tensor '{key}' not found once in the shard")
        obj[match[0]] = _new_tensor(key, obj[match[0]], parts, rewrite, str(source))
    tmp = output.with_name(output.name + ".lipcheck-part")
    torch.save(obj, tmp)
    os.replace(tmp, output)


def _fresh_index(index: Path, out: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """The index with the same weight_map and a ``metadata.total_size`` that is the sum of
    the listed tensors' data bytes."""
    doc = json.loads(index.read_text(encoding="utf-8"))
    total = 0
    for name, shard in getattr(tensors, "where", {}).items():
        if isinstance(shard, SafetensorsFile):
            _, _, begin, end = shard.layout[name]
            total += end - begin
        else:
            t = shard[name]
            total += t.numel() * t.element_size()
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    meta["total_size"] = total
    doc["metadata"] = meta
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
