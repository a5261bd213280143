"""--from: the network bound from a node, layer or value on (what LLM users want after the token
embedding), everything not computed from it held fixed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import lipcheck
from lipcheck.errors import UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SCHEMA = json.loads((Path(lipcheck.__file__).parent / "schema.json").read_text())


class EmbedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 8)

    def after_embedding(self, e: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(e)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.after_embedding(self.emb(ids))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbedMLP, Path]:
    torch.manual_seed(0)
    m = EmbedMLP().eval()
    path = tmp_path_factory.mktemp("from") / "emb.onnx"
    torch.onnx.export(m, (torch.zeros(1, 5, dtype=torch.long),), str(path), dynamo=False, input_names=["ids"])
    return m, path


def _sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), 2))


def test_embedding_makes_the_network_unbounded_and_from_gives_a_number(model: tuple[EmbedMLP, Path]) -> None:
    m, path = model
    whole = lipcheck.analyze(path)
    assert not whole.network.bounded and "Gather" in whole.network.reason
    rep = lipcheck.analyze(path, start="emb")
    doc = rep.to_dict()
    jsonschema.validate(doc, SCHEMA)
    net = rep.network
    assert net.bounded and net.start is not None and net.start.startswith("/emb/")
    # sound: at least the Jacobian norm of the part after the embedding at many points
    # (per token: the map acts on each of the 5 tokens alike, block-diagonally)
    f = m.double().after_embedding
    g = torch.Generator().manual_seed(1)
    largest = 0.0
    for _ in range(50):
        e = torch.randn(16, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(f, e)
        largest = max(largest, _sigma(jac))
    m.float()
    assert largest <= net.lipschitz_bound
    # and at most the product of the two layers' exact norms (ReLU: 1)
    assert net.lipschitz_bound <= _sigma(m.l1.weight) * _sigma(m.l2.weight) * (1 + 1e-5)
    rows = {r.name: r for r in rep.layers}
    assert rows["l1"].bound is not None


def test_from_a_value_name_and_inside_a_chain(model: tuple[EmbedMLP, Path]) -> None:
    m, path = model
    by_value = lipcheck.analyze(path, start="/emb/Gather_output_0")
    assert by_value.network.lipschitz_bound == lipcheck.analyze(path, start="emb").network.lipschitz_bound
    # from l1's output: the bias, ReLU and l2 follow (the chain certificate is not used across it)
    rep = lipcheck.analyze(path, start="l1")
    assert rep.network.bounded
    assert _sigma(m.l2.weight) <= rep.network.lipschitz_bound <= _sigma(m.l2.weight) * (1 + 1e-5)
    assert {r.name: r for r in rep.layers}["l1"].bound is None  # before the start


def test_from_between_a_conv_and_its_batchnorm() -> None:
    """The pair is not folded across the start: the bound from the conv's output is a number."""
    import onnx

    graph = onnx.load(str(SAMPLES / "cnn.onnx")).graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    consumers = [n for n in graph.node if conv.output[0] in n.input]
    assert consumers and consumers[0].op_type == "BatchNormalization"
    rep = lipcheck.analyze(SAMPLES / "cnn.onnx", start=conv.output[0])
    assert rep.network.bounded, rep.network.reason
    assert "--from starts inside" not in rep.network.reason


def test_unknown_name_is_one_line_with_close_names(model: tuple[EmbedMLP, Path], cli) -> None:  # type: ignore[no-untyped-def]
    _, path = model
    with pytest.raises(UsageError, match="close names"):
        lipcheck.analyze(path, start="emb/Gather")
    code, out, err = cli("inspect", path, "--from", "nowhere-at-all", "-f", "json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("lipcheck: error: --from 'nowhere-at-all'")


def test_weights_only_input_is_refused(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli("inspect", SAMPLES / "mlp.state_dict.pt", "--from", "fc1")
    assert code == 2 and out == "" and "--from needs a model with a graph" in err


def test_check_gates_the_bound_from_the_start(model: tuple[EmbedMLP, Path], cli) -> None:  # type: ignore[no-untyped-def]
    _, path = model
    code, _, err = cli("check", path, "--max-lipschitz", "1000")
    assert code == 1  # the whole network has no bound
    code, _, err = cli("check", path, "--from", "emb", "--max-lipschitz", "1000")
    assert code == 0, err


def test_every_output_names_the_start(model: tuple[EmbedMLP, Path], cli) -> None:  # type: ignore[no-untyped-def]
    _, path = model
    for fmt, expected in (("html", "(--from)"), ("markdown", "(--from)"), ("table", "(--from)"),
                          ("json", '"start": "/emb/Gather_output_0"')):
        code, out, err = cli("inspect", path, "--from", "emb", "-f", fmt)
        assert code == 0, err
        assert expected in out, fmt
