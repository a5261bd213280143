"""Every file format of the same model gives the same numbers.

For the sample mlp / cnn / resnet: the ONNX file, the TorchScript file traced at an input
shape, the pickled module (``trust=True``) and the in-memory module all yield the same
per-layer sigma / sigma_upper (by row name) and the same network bound. Weight-only forms
(state_dict, checkpoint dicts, DataParallel prefixes, legacy non-zip files, TorchScript
without an input shape) give per-tensor rows that agree with the graph rows, and no
network bound.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES

import lipcheck
from lipcheck import testing as lt
from lipcheck.errors import UntrustedInputError

BUILDERS = {"mlp": lt.make_mlp, "cnn": lt.make_cnn, "resnet": lt.make_resnet}
NAMES = list(BUILDERS)
GRAPH_FORMATS = ["ts", "pickle", "module"]
RTOL = 1e-6
ROW_FIELDS = (
    "name",
    "op",
    "kind",
    "sigma",
    "sigma_matrix",
    "sigma_upper",
    "upper_method",
    "lipschitz",
    "iterations",
    "converged",
    "note",
)


def _analyze(source, shape=None, **kw):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipcheck.analyze(source, shape, device="cpu", **kw)


def _close(a: float | None, b: float | None, rel: float = RTOL) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=rel, abs=1e-12)


def _by_name(rep) -> dict:  # type: ignore[no-untyped-def]
    rows = {r.name: r for r in rep.layers}
    assert len(rows) == len(rep.layers), "row names must be unique"
    return rows


def _row_tuple(row) -> tuple:  # type: ignore[no-untyped-def]
    return tuple(getattr(row, f) for f in ROW_FIELDS)


# --------------------------------------------------------------------------- graph formats


@pytest.fixture(scope="module")
def graph_reports() -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for name, builder in BUILDERS.items():
        model, shape = builder(0)
        out[name] = {
            "onnx": _analyze(SAMPLES / f"{name}.onnx"),
            "ts": _analyze(SAMPLES / f"{name}.ts.pt", shape, trust=True),
            "pickle": _analyze(SAMPLES / f"{name}.pickle.pt", shape, trust=True),
            "module": _analyze(model, shape),
        }
    return out


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_graph_formats_same_rows(name: str, fmt: str, graph_reports) -> None:  # type: ignore[no-untyped-def]
    ref = _by_name(graph_reports[name]["onnx"])
    got = _by_name(graph_reports[name][fmt])
    assert list(got) == list(ref), f"{fmt} rows differ from the ONNX rows"
    for key, r in ref.items():
        g = got[key]
        assert (g.op, g.kind) == (r.op, r.kind), key
        for field in ("sigma", "sigma_matrix", "sigma_upper", "lipschitz", "bound"):
            assert _close(getattr(g, field), getattr(r, field)), (key, field, getattr(g, field), getattr(r, field))


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_graph_formats_same_network_bound(name: str, fmt: str, graph_reports) -> None:  # type: ignore[no-untyped-def]
    ref = graph_reports[name]["onnx"].network
    got = graph_reports[name][fmt].network
    assert ref.bounded and ref.certified, ref.reason
    assert got.bounded and got.certified, got.reason
    assert _close(got.lipschitz_bound, ref.lipschitz_bound)
    assert _close(got.lipschitz_estimate, ref.lipschitz_estimate)


@pytest.mark.parametrize("name", NAMES)
def test_graph_formats_report_their_format(name: str, graph_reports) -> None:  # type: ignore[no-untyped-def]
    formats = {k: rep.model.format for k, rep in graph_reports[name].items()}
    assert formats["onnx"] == "onnx"
    assert formats["ts"] == "torchscript"
    assert len(set(formats.values())) == 4, formats


@pytest.mark.parametrize("name", NAMES)
def test_pickle_without_trust_is_refused(name: str) -> None:
    _, shape = BUILDERS[name](0)
    with pytest.raises(UntrustedInputError):
        _analyze(SAMPLES / f"{name}.pickle.pt", shape)
    with pytest.raises(UntrustedInputError):
        _analyze(SAMPLES / f"{name}.pickle.pt")


# --------------------------------------------------------------------------- weights only


@pytest.fixture(scope="module")
def sd_reports() -> dict[str, object]:
    return {name: _analyze(SAMPLES / f"{name}.state_dict.pt") for name in NAMES}


def _assert_no_network(rep) -> None:  # type: ignore[no-untyped-def]
    net = rep.network
    assert net.bounded is False
    assert net.certified is False
    assert net.lipschitz_bound is None
    assert isinstance(net.reason, str) and net.reason.strip()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_rows_match_graph(name: str, sd_reports, graph_reports) -> None:  # type: ignore[no-untyped-def]
    rep = sd_reports[name]
    _assert_no_network(rep)
    assert rep.model.format == "state_dict"
    assert all(r.bound is None for r in rep.layers), "per-tensor rows have no network bound"
    onnx_rows = _by_name(graph_reports[name]["onnx"])
    sd_rows = _by_name(rep)
    linear = [r for r in sd_rows.values() if r.op == "Linear"]
    assert linear
    for row in linear:
        assert row.name in onnx_rows, (row.name, sorted(onnx_rows))
        ref = onnx_rows[row.name]
        assert ref.op == "Gemm"
        assert _close(row.sigma, ref.sigma), (row.name, row.sigma, ref.sigma)
        assert _close(row.sigma_upper, ref.sigma_upper), (row.name, row.sigma_upper, ref.sigma_upper)
    # Every weighted graph row has a per-tensor counterpart.
    weighted = {k for k, r in onnx_rows.items() if r.op in ("Gemm", "Conv", "BatchNormalization")}
    assert weighted <= set(sd_rows), sorted(weighted - set(sd_rows))


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_state_dict_conv_and_batchnorm_rows(name: str, sd_reports, graph_reports) -> None:  # type: ignore[no-untyped-def]
    onnx_rows = _by_name(graph_reports[name]["onnx"])
    for row in sd_reports[name].layers:
        ref = onnx_rows[row.name]
        if ref.op == "BatchNormalization":
            assert row.kind == "diagonal"
            assert _close(row.lipschitz, ref.lipschitz), (row.name, row.lipschitz, ref.lipschitz)
        elif ref.op == "Conv":
            assert row.kind == "conv"
            # sigma_matrix is a property of the weight alone.
            assert _close(row.sigma_matrix, ref.sigma_matrix), (row.name, row.sigma_matrix, ref.sigma_matrix)
            # The size-independent certificate must hold at the actual input size too.
            assert row.sigma_upper >= ref.sigma * (1 - RTOL), (row.name, row.sigma_upper, ref.sigma)


def _save_variants(name: str, tmp: Path) -> dict[str, Path]:
    sd = torch.load(SAMPLES / f"{name}.state_dict.pt", map_location="cpu", weights_only=True)
    paths = {
        "checkpoint": tmp / f"{name}.ckpt.pt",
        "dataparallel": tmp / f"{name}.dp.pt",
        "legacy": tmp / f"{name}.legacy.pt",
        "legacy_checkpoint": tmp / f"{name}.legacy_ckpt.pt",
    }
    torch.save({"epoch": 3, "state_dict": sd}, paths["checkpoint"])
    torch.save({f"module.{k}": v for k, v in sd.items()}, paths["dataparallel"])
    torch.save(sd, paths["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"epoch": 3, "state_dict": sd}, paths["legacy_checkpoint"], _use_new_zipfile_serialization=False)
    return paths


@pytest.mark.parametrize("variant", ["checkpoint", "dataparallel", "legacy", "legacy_checkpoint"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_variants_same_rows(name: str, variant: str, tmp_path: Path, sd_reports) -> None:  # type: ignore[no-untyped-def]
    path = _save_variants(name, tmp_path)[variant]
    if variant == "legacy":
        with path.open("rb") as fh:
            assert not fh.read(4).startswith(b"PK"), "legacy torch.save must not be a zip"
    rep = _analyze(path)
    _assert_no_network(rep)
    ref = sd_reports[name]
    assert [_row_tuple(r) for r in rep.layers] == [_row_tuple(r) for r in ref.layers]
    assert [(s.name, s.op) for s in rep.skipped] == [(s.name, s.op) for s in ref.skipped]
    if variant.endswith("checkpoint"):
        assert any("state_dict" in note for note in rep.notes), rep.notes


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_without_shape_is_per_tensor(name: str, sd_reports) -> None:  # type: ignore[no-untyped-def]
    rep = _analyze(SAMPLES / f"{name}.ts.pt")
    _assert_no_network(rep)
    assert rep.model.format == "torchscript"
    assert rep.layers
    assert all(r.bound is None for r in rep.layers)
    assert {r.op for r in rep.layers} <= {"Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm"}
    # The same tensors as the state_dict, so the same rows.
    ref = sd_reports[name]
    assert [_row_tuple(r) for r in rep.layers] == [_row_tuple(r) for r in ref.layers]
