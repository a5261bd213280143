"""Files whose loading would run code: pickles with globals, TorchScript and torch.export
archives, numpy objects. lipcheck must refuse them (or read their weights without running
anything)."""

from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .forge import (
    OpenPayload,
    P,
    SystemPayload,
    quiet_save,
    torch_zip,
)
from .registry import case


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
