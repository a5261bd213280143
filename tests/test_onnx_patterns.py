"""Pattern matchers on ONNX graphs as real exporters write them: constants of any shape,
under the numpy a fresh install resolves to (numpy 2 refuses float() on a (1,)-array)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import lipcheck

GELU_LIP = 1.1289  # sup |GELU'| (DESIGN.md), rounded down


def _erf_gelu_model(shape: tuple[int, ...], values: list[float] | None = None) -> onnx.ModelProto:
    """y = W2 (0.5 * h * (1 + erf(h / sqrt2))), h = W1 x, constants of the given shape."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)

    def const(name: str, value: float) -> onnx.TensorProto:
        if values is not None and name == "sqrt2":
            return numpy_helper.from_array(np.array(values, dtype=np.float32), name)
        return numpy_helper.from_array(np.array([value], dtype=np.float32).reshape(shape), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Div", ["h", "sqrt2"], ["hs"]),
        helper.make_node("Erf", ["hs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["g2"]),
        helper.make_node("Mul", ["g2", "half"], ["g"]),
        helper.make_node("Gemm", ["g", "w2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "gelu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _jacobian_norm(w1: np.ndarray, w2: np.ndarray, x: torch.Tensor) -> float:
    f = lambda v: torch.nn.functional.gelu(v @ torch.from_numpy(w1).double().T) @ torch.from_numpy(w2).double().T  # noqa: E731
    return float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(f, x.double()), 2))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_erf_gelu_with_shaped_constants(shape: tuple[int, ...], tmp_path: Path) -> None:
    model = _erf_gelu_model(shape)
    path = tmp_path / "gelu.onnx"
    onnx.save(model, str(path))
    report = lipcheck.analyze(path)
    assert report.network.bounded, report.network.reason
    w1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    w2 = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    product = float(np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2))
    # Recognised as one GELU: the bound is the product of the exact norms times sup |GELU'|.
    if report.network.composition in ("eclipse", "eclipse-fast"):  # a chain: tighter than the product
        assert report.network.lipschitz_bound <= product * GELU_LIP * (1 + 1e-3)
    else:
        assert report.network.lipschitz_bound == pytest.approx(product * GELU_LIP, rel=1e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = torch.randn(4, generator=rng) * 2
        assert _jacobian_norm(w1, w2, x) <= report.network.lipschitz_bound


def test_several_valued_constant_is_not_a_gelu(tmp_path: Path) -> None:
    """A divisor with several values is not the erf GELU: no crash, and no GELU claimed."""
    model = _erf_gelu_model((1,), values=[math.sqrt(2)] * 5 + [1.0])
    path = tmp_path / "not_gelu.onnx"
    onnx.save(model, str(path))
    report = lipcheck.analyze(path)
    assert not any("GELU" in (r.op or "") + (r.note or "") for r in report.layers)


@pytest.mark.parametrize("beta", [1.0, pytest.param(2.0, marks=pytest.mark.e2e)])  # another beta: e2e
def test_dynamo_softplus_is_one_activation(beta: float, tmp_path: Path) -> None:
    """torch's dynamo exporter writes Softplus as Where(Greater(beta x, 20), x,
    Softplus(beta x) / beta): recognised, constant 1 and slopes [0, 1], like the legacy
    Softplus node."""
    import warnings

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Softplus(beta=beta), nn.Linear(6, 3)).eval()
    path = tmp_path / "softplus.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 4),), str(path), dynamo=True, verbose=False)
    assert any(n.op_type == "Where" for n in onnx.load(str(path)).graph.node)
    report = lipcheck.analyze(path)
    assert report.network.bounded, report.network.reason
    norms = [float(torch.linalg.matrix_norm(m.weight.detach().double(), 2)) for m in (model[0], model[2])]
    # slopes in [0, 1]: an ECLipsE chain, at most the product of the norms
    assert report.network.composition == "eclipse", report.network.reason
    assert report.network.lipschitz_bound <= norms[0] * norms[1] * (1 + 1e-5)
    for seed in range(6):
        x = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        jac = torch.autograd.functional.jacobian(lambda v: model.double()(v), x)
        assert float(torch.linalg.matrix_norm(jac, 2)) <= report.network.lipschitz_bound
    assert not report.skipped


def _export(model: torch.nn.Module, path: Path, dynamo: bool, opset: int | None = None) -> onnx.ModelProto:
    import warnings

    kwargs = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 4),), str(path), dynamo=dynamo, verbose=False, **kwargs)
    return onnx.load(str(path))


def _max_jacobian(model: torch.nn.Module, seeds: int = 8, scale: float = 3.0) -> float:
    m64 = __import__("copy").deepcopy(model).double()
    best = 0.0
    for seed in range(seeds):
        x = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
        jac = torch.autograd.functional.jacobian(m64, x).reshape(-1, 4)
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def _linear_norms(model: torch.nn.Module) -> list[float]:
    return [float(torch.linalg.matrix_norm(m.weight.detach().double(), 2))
            for m in model.modules() if isinstance(m, torch.nn.Linear)]


# (exporter, opset, the ops that must carry the GELU): the legacy exporter below opset 20 and
# the dynamo exporter at 18 write the erf form (Constant nodes of shape (), or initializers);
# both write a Gelu node at their default opset.
GELU_EXPORTS = [(False, 17, "Erf"), (True, 18, "Erf"), (False, None, "Gelu"), (True, None, "Gelu")]


@pytest.mark.parametrize(("dynamo", "opset", "op"), GELU_EXPORTS)
def test_torch_exported_gelu_is_recognised(dynamo: bool, opset: int | None, op: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 3)).eval()
    path = tmp_path / "gelu.onnx"
    exported = _export(model, path, dynamo, opset)
    assert op in {n.op_type for n in exported.graph.node}
    report = lipcheck.analyze(path)
    assert report.network.bounded, report.network.reason
    assert not report.skipped
    product = math.prod(_linear_norms(model))
    if report.network.composition in ("eclipse", "eclipse-fast"):  # a chain: tighter than the product
        assert report.network.lipschitz_bound <= product * GELU_LIP * (1 + 1e-3)
    else:
        assert report.network.lipschitz_bound == pytest.approx(product * GELU_LIP, rel=1e-3)
    gelu = [r for r in report.layers if r.kind == "activation" and (r.op == "Gelu" or "GELU" in (r.note or ""))]
    assert len(gelu) == 1
    assert _max_jacobian(model) <= report.network.lipschitz_bound


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_legacy_softplus_bound_is_the_linear_product(beta: float, tmp_path: Path) -> None:
    """The legacy exporter's Softplus node (with Mul/Div around it for beta != 1)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Softplus(beta=beta), torch.nn.Linear(6, 3)).eval()
    path = tmp_path / "softplus.onnx"
    exported = _export(model, path, dynamo=False)
    assert "Softplus" in {n.op_type for n in exported.graph.node}
    report = lipcheck.analyze(path)
    assert report.network.bounded, report.network.reason
    if report.network.composition in ("eclipse", "eclipse-fast"):  # a chain: tighter than the product
        assert report.network.lipschitz_bound <= math.prod(_linear_norms(model)) * (1 + 1e-3)
    else:
        assert report.network.lipschitz_bound == pytest.approx(math.prod(_linear_norms(model)), rel=1e-5)
    assert _max_jacobian(model) <= report.network.lipschitz_bound


def test_dynamo_softplus_with_a_visible_jump_is_not_lipschitz(tmp_path: Path) -> None:
    """Softplus(threshold=5) as torch computes it jumps by softplus(-5) = 0.0067 at x = 5: no
    finite constant exists, and lipcheck says so rather than certify 1."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Softplus(threshold=5.0)).eval()
    path = tmp_path / "softplus.onnx"
    _export(model, path, dynamo=True)
    report = lipcheck.analyze(path)
    assert not report.network.bounded
    assert "jumps by 0.0067" in report.network.reason
    left, right = torch.tensor([5.0 - 1e-6]), torch.tensor([5.0 + 1e-6])
    assert abs(float(model[1](right) - model[1](left))) > 0.006  # torch's own function jumps there


@pytest.mark.parametrize("mode", [np.array(False), np.array([False]), np.array([[False]]), np.array([]),
                                  np.array([True])])
def test_dropout_mode_of_any_shape(mode: np.ndarray, tmp_path: Path) -> None:
    """Dropout's training_mode input of shape (), (1,) or (1, 1): read, never a crash."""
    nodes = [helper.make_node("Dropout", ["x", "ratio", "mode"], ["y"], name="drop")]
    graph = helper.make_graph(
        nodes, "drop", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "ratio"),
         numpy_helper.from_array(mode.astype(bool), "mode")])
    path = tmp_path / "drop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = lipcheck.analyze(path)
    inference = mode.size == 1 and not bool(mode.reshape(-1)[0])
    assert report.network.bounded == inference, report.network.reason
    if inference:
        assert report.network.lipschitz_bound == 1.0


def test_erf_gelu_with_the_half_on_x_and_a_multiplied_erf_argument(tmp_path: Path) -> None:
    """(0.5 x) * (1 + erf(x * 0.7071...)) with (1, 1, 1)-shaped constants: GELU(x), constant
    sup |GELU'| (not twice it), and at least the Jacobian norm."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)

    def const(name: str, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.full((1, 1, 1), value, dtype=np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Mul", ["half", "h"], ["hh"]),
        helper.make_node("Mul", ["h", "rsqrt2"], ["hs"]),
        helper.make_node("Erf", ["hs"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["e1"]),
        helper.make_node("Mul", ["e1", "hh"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 6])],
        [numpy_helper.from_array(w1, "w1"), const("half", 0.5), const("one", 1.0),
         const("rsqrt2", 1 / math.sqrt(2))])
    path = tmp_path / "gelu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = lipcheck.analyze(path)
    assert report.network.bounded, report.network.reason
    norm = float(np.linalg.norm(w1.astype(np.float64), 2))
    if report.network.composition in ("eclipse", "eclipse-fast"):  # a chain: tighter than the product
        assert report.network.lipschitz_bound <= norm * GELU_LIP * (1 + 1e-3)
    else:
        assert report.network.lipschitz_bound == pytest.approx(norm * GELU_LIP, rel=1e-3)
    f = lambda v: torch.nn.functional.gelu(v @ torch.from_numpy(w1).double().T)  # noqa: E731
    for seed in range(6):
        x = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
        jac = torch.autograd.functional.jacobian(f, x)
        assert float(torch.linalg.matrix_norm(jac, 2)) <= report.network.lipschitz_bound


def test_resize_of_an_empty_tensor_is_the_zero_map(tmp_path: Path) -> None:
    """A zero-size dim used to divide by zero in the Resize rule (exit 3)."""
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")]
    graph = helper.make_graph(
        nodes, "resize", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 0, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1.0, 1.0, 2.0], dtype=np.float32), "scales")])
    path = tmp_path / "resize.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = lipcheck.analyze(path)
    assert report.network.bounded and report.network.lipschitz_bound == 0.0
