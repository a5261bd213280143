"""The activation table (rules.elementwise.ACTIVATION_FACTS) against the functions
themselves: every constant is at least the largest difference quotient on a fine float64
grid (sound) and close to it (not a loose placeholder), every slope range contains all of
them, and activations with a jump get no number."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from lipcheck.graph import Node
from lipcheck.rules.elementwise import ACTIVATION_FACTS

# ONNX op -> (attributes, the same function in float64 torch)
FUNCTIONS = {
    "Relu": ({}, F.relu),
    "Tanh": ({}, torch.tanh),
    "Softplus": ({}, F.softplus),
    "Softsign": ({}, F.softsign),
    "Abs": ({}, torch.abs),
    "Neg": ({}, torch.neg),
    "Celu": ({}, F.celu),
    "Clip": ({}, lambda x: x.clamp(-1, 1)),
    "LeakyRelu": ({"alpha": 0.2}, lambda x: F.leaky_relu(x, 0.2)),
    "Elu": ({"alpha": 1.5}, lambda x: F.elu(x, 1.5)),
    "Selu": ({}, F.selu),
    "Erf": ({}, torch.erf),
    "Sigmoid": ({}, torch.sigmoid),
    "HardSigmoid": ({"alpha": 0.2}, lambda x: (0.2 * x + 0.5).clamp(0, 1)),
    "HardSwish": ({}, F.hardswish),
    "Gelu": ({}, F.gelu),
    "Mish": ({}, F.mish),
    "Swish": ({}, F.silu),
}


def _node(op: str, attrs: dict) -> Node:  # type: ignore[type-arg]
    return Node(index=0, name=op, op=op, domain="", inputs=["x"], outputs=["y"], attrs=attrs)


def _quotients(f) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = torch.linspace(-12, 12, 480001, dtype=torch.float64)
    y = f(x)
    return (y[1:] - y[:-1]) / (x[1:] - x[:-1])


@pytest.mark.parametrize("op", sorted(FUNCTIONS))
def test_constant_and_slopes_hold(op: str) -> None:
    attrs, f = FUNCTIONS[op]
    facts = ACTIVATION_FACTS[op]
    node = _node(op, attrs)
    constant = facts.constant(attrs, node, None)  # type: ignore[arg-type]
    q = _quotients(f)
    largest = q.abs().max().item()
    assert constant is not None and largest <= constant * (1 + 1e-9)
    assert largest >= constant * 0.995, f"{op}: {constant} is loose, the function reaches only {largest}"
    if facts.slopes is not None:
        a, b = facts.slopes(attrs)
        assert a - 1e-9 <= q.min().item() and q.max().item() <= b + 1e-9


def test_every_table_entry_is_tested_or_has_no_number() -> None:
    untested = set(ACTIVATION_FACTS) - set(FUNCTIONS)
    # not element-wise functions of one scalar (PRelu reads its slope tensor, Softmax and
    # LogSoftmax mix a whole axis: tests elsewhere), or no finite constant at all
    assert untested == {"PRelu", "Softmax", "LogSoftmax", "Sign", "ThresholdedRelu"}


@pytest.mark.parametrize("op,attrs", [("Sign", {}), ("ThresholdedRelu", {"alpha": 1.0})])
def test_jumps_get_no_number(op: str, attrs: dict, tmp_path) -> None:  # type: ignore[no-untyped-def,type-arg]
    import onnx

    from lipcheck import api

    assert ACTIVATION_FACTS[op].constant(attrs, _node(op, attrs), None) is None  # type: ignore[arg-type]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    net = api.analyze(path).network
    assert not net.bounded and "not continuous" in net.reason


@pytest.mark.parametrize("to,bounded", [(TensorProto.INT64, False), (TensorProto.BOOL, False),
                                        (TensorProto.FLOAT16, True), (TensorProto.DOUBLE, True)])
def test_cast_to_integers_is_a_jump(to: int, bounded: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from lipcheck import api

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=to), helper.make_node("Cast", ["h"], ["y"], to=1)]
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    net = api.analyze(path).network
    assert net.bounded is bounded
    if bounded:
        assert net.lipschitz_bound is not None and math.isclose(net.lipschitz_bound, 1.0)
