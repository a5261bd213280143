"""Reading torch.save files and raw pickles safely: declared sizes checked against the file
before torch allocates them (zip members, legacy storages), ``torch.load`` with
``weights_only=True`` unless trusted (a refusal names the offending global; torch's allow-list
suggestions are never applied), raw pickles only with ``--trust``."""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UntrustedInputError
from . import ZIP_ERRORS

# Deflate cannot expand data more than 1032:1; a zip member claiming more is forged.
MAX_DEFLATE_RATIO = 1032
MAX_NAMED_GLOBALS = 3


def is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"PK"


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- size checks


def check_zip_sizes(path: Path) -> None:
    """Every member's declared sizes fit in the file: torch's zip reader allocates a
    record's declared size before reading it."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except ZIP_ERRORS as exc:
        raise InputError(f"{path} is a damaged or truncated zip archive: {exc}") from None
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise InputError(
                f"{path}: zip member '{info.filename}' declares {info.compress_size} bytes at offset "
                f"{info.header_offset}, beyond the {size}-byte file (truncated or forged)"
            )
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
            info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1)
        ):
            raise InputError(
                f"{path}: zip member '{info.filename}' declares {info.file_size} bytes from "
                f"{info.compress_size} stored bytes (forged size)"
            )


# Bytes per element of each storage class named in torch.save pickles.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
    "QInt8Storage": torch.int8, "QUInt8Storage": torch.uint8, "QInt32Storage": torch.int32,
}


class _Opaque:
    """Stands in for every global a scanned pickle names: calling, building or filling
    it does nothing, so a scan never imports or runs anything."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _ScanUnpickler(pickle.Unpickler):
    """Walks a pickle with placeholders for all globals and records the storages its
    persistent ids declare: ('storage', type, key, location, numel[, view])."""

    def __init__(self, fh: Any) -> None:
        super().__init__(fh)
        self.storages: dict[str, tuple[str, int]] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._classes:
            self._classes[full] = type("Opaque", (_Opaque,), {"qualname": full})
        return self._classes[full]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "qualname", "?").rpartition(".")[2]
            if isinstance(pid[2], str) and isinstance(pid[4], int):
                self.storages[pid[2]] = (kind, pid[4])
        return _Opaque()


def check_legacy_sizes(path: Path) -> None:
    """A legacy torch.save file is five pickles (magic, protocol, sys info, the object,
    the storage keys) and then, per key, an int64 element count and the raw bytes.
    torch allocates each declared storage before reading it, so the declared counts are
    checked against the bytes that are really there first. A file this scan cannot
    follow is left to torch's own checks."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        try:
            for _ in range(3):
                _ScanUnpickler(fh).load()
            scan = _ScanUnpickler(fh)
            scan.load()
            keys = _ScanUnpickler(fh).load()
        except Exception:  # noqa: BLE001 - not a scannable legacy file; torch will say why
            return
        if not isinstance(keys, list):
            return
        position = fh.tell()
        for key in keys:
            if key not in scan.storages:
                return
            kind, numel = scan.storages[key]
            dtype = STORAGE_DTYPES.get(kind)
            if dtype is None:
                return
            itemsize = torch.empty((), dtype=dtype).element_size()
            fh.seek(position)
            count = fh.read(8)
            if len(count) < 8:
                raise InputError(f"{path}: legacy torch.save file is truncated (storage '{key}' is missing)")
            stored = int.from_bytes(count, "little", signed=True)
            need = 8 + numel * itemsize
            if numel < 0 or stored != numel or position + need > size:
                raise InputError(
                    f"{path}: storage '{key}' declares {numel} elements ({numel * itemsize} bytes) but "
                    f"the file holds {max(size - position - 8, 0)} bytes from there (truncated or forged)"
                )
            position += need


# --------------------------------------------------------------------------- torch.load


GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# Words in torch's weights_only errors that say a global was refused, not that the
# pickle is damaged.
REFUSED_WORDS = ("Unsupported global", "unsupported GLOBAL", "Unsupported class", "not an allowed global")


def torch_load(path: Path, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, ...
        text = str(exc)
        if trust or "Weights only load failed" not in text:
            raise InputError(f"{path} cannot be read by torch.load: {first_line(exc)}") from None
        named = GLOBAL_RE.findall(text) or _unsafe_globals(path)
        if named or any(word in text for word in REFUSED_WORDS):
            raise UntrustedInputError(
                f"{path} holds pickled Python objects{_naming(named)} that only load by running code; "
                "lipcheck loads weights only by default. If you trust this file, pass --trust."
            ) from None
        reason = _weights_unpickler_reason(text)
        raise InputError(f"{path} is a damaged torch.save file: {reason}") from None


def _naming(names: list[str]) -> str:
    if not names:
        return ""
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:MAX_NAMED_GLOBALS]) + (", ..." if len(unique) > MAX_NAMED_GLOBALS else "")
    return f" (it references {shown})"


def _weights_unpickler_reason(text: str) -> str:
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # torch puts the unpickler's own words after a blank line, before the docs link.
    candidates = [ln for ln in lines if not ln.startswith(("Weights only", "Check the documentation",
                                                           "Please file", "(1)", "(2)", "In PyTorch"))]
    return candidates[0][:300] if candidates else "its pickle cannot be read"


def pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle names, read statically with pickletools (nothing is
    unpickled). STACK_GLOBAL takes its module and name from the last two strings pushed,
    which are tracked through the memo."""
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE") and isinstance(arg, str):
                strings.append(arg)
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings and isinstance(arg, int):
                memo[arg] = strings[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int) and arg in memo:
                strings.append(memo[arg])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - a damaged pickle: report what was read so far
        pass
    return names


def _unsafe_globals(path: Path) -> list[str]:
    """Globals in the file's pickle that torch's weights-only unpickler does not allow."""
    try:
        if is_zip(path):
            with zipfile.ZipFile(path) as zf:
                pkl = min((n for n in zf.namelist() if n.endswith("data.pkl")), key=len)
                data = zf.read(pkl)
        else:
            with path.open("rb") as fh:
                data = fh.read(1 << 20)
            data = _skip_pickles(data, 3)
    except Exception:  # noqa: BLE001 - best effort: the message just names nothing
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private API; without it every global is named
        allowed = set()
    return [n for n in pickle_globals(data) if n not in allowed]


def _skip_pickles(data: bytes, count: int) -> bytes:
    position = 0
    for _ in range(count):
        for op, _, pos in pickletools.genops(data[position:]):
            if op.name == "STOP":
                assert pos is not None  # genops gives positions for in-memory data
                position += pos + 1
                break
    return data[position:]


def raw_pickle_load(path: Path, trust: bool) -> Any:
    """A pickle that is not a torch.save file: torch.load cannot read it, and only a
    plain unpickler can, which runs whatever the pickle names. Refused without --trust."""
    with path.open("rb") as fh:
        data = fh.read(1 << 20)
    if not trust:
        names = pickle_globals(data)
        if names:
            raise UntrustedInputError(
                f"{path} is a plain Python pickle, not a torch.save file{_naming(names)}; unpickling "
                "it runs code, so lipcheck opens it only with --trust"
            )
        raise InputError(f"{path} is a plain Python pickle with no tensors in it (or a damaged one)")
    try:
        with path.open("rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - the pickle is the user's; any failure is the file's
        raise InputError(f"{path} cannot be unpickled: {first_line(exc)}") from None
