"""Modules lipcheck traces itself (``--input-shape`` on TorchScript with ``--trust``, pickled
modules): parametrized spectral norm (``aten::vdot``) and attention (the fused
``aten::_native_multi_head_attention`` / ``_transformer_encoder_layer_fwd`` kernels, which
no exporter translates) give every Linear row, each equal to the exact norm of the weight
the model computes with; when every export step fails, one line names each step."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import Cli, exact_norm
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

SEQ, EMBED = 4, 16
SHAPE = (1, SEQ, EMBED)


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """What a parametrized spectral_norm layer multiplies by in eval mode, from its stored
    tensors: W_orig / (uᵀ W_orig v), u and v frozen (torch's SpectralNorm._power_method
    runs only in training)."""
    original = layer.parametrizations.weight.original.detach().double()
    sn = layer.parametrizations.weight[0]
    u, v = sn._u.double(), sn._v.double()
    return original / (u @ original @ v)


def stale_spectral_norm(layer: nn.Linear, seed: int) -> nn.Linear:
    """A parametrized-SN Linear whose u, v lag its weight (as after an optimizer step), so
    the effective weight's norm is neither 1 nor the stored weight's norm over 1."""
    layer = spectral_norm(layer)
    layer.train()
    layer(torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        original = layer.parametrizations.weight.original
        original.mul_(3).add_(0.2 * torch.randn(original.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return layer.eval()


def save_traced(module: nn.Module, example: torch.Tensor, path: Path, *, grad: bool = True) -> Path:
    with warnings.catch_warnings(), torch.set_grad_enabled(grad):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
    torch.jit.save(traced, str(path))
    return path


def fused_kernels(path: Path) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.jit.load(str(path)).inlined_graph
    return {n.kind() for n in graph.nodes()} & {"aten::_native_multi_head_attention",
                                                "aten::_transformer_encoder_layer_fwd", "aten::vdot"}


def inspect(cli: Cli, path: Path, shape: tuple[int, ...]) -> dict:
    code, out, err = cli("inspect", path, "--trust", "--input-shape", ",".join(map(str, shape)),
                         "--format", "json", "--no-progress")
    assert code == 0, err
    doc: dict = json.loads(out)  # one model: the report itself
    return doc


def linear_rows(doc: dict) -> list[dict]:
    return [r for r in doc["layers"] if r["kind"] == "linear"]


def test_parametrized_spectral_norm_reports_the_effective_weight(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(stale_spectral_norm(nn.Linear(8, 8), seed=1), nn.ReLU(), nn.Linear(8, 2)).eval()
    path = save_traced(model, torch.zeros(1, 8), tmp_path / "sn.ts.pt")
    assert "aten::vdot" in fused_kernels(path)  # what the legacy exporter lacked a symbolic for
    exact = exact_norm(effective_weight(model[0]))
    stored = exact_norm(model[0].parametrizations.weight.original.detach())
    assert abs(exact - 1) > 0.01 and abs(stored - exact) > 1  # the test tells the three apart
    row = {r["name"]: r for r in inspect(cli, path, (1, 8))["layers"]}["0"]
    assert row["sigma"] == pytest.approx(exact, rel=1e-5)
    assert row["sigma_upper"] >= exact * (1 - 1e-9)


class SpectralAttention(nn.Module):
    """A spectrally normalized input projection, self-attention and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = stale_spectral_norm(nn.Linear(EMBED, EMBED), seed=2)
        self.attn = nn.MultiheadAttention(EMBED, 2, batch_first=True)
        self.head = nn.Linear(EMBED, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.head(self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.e2e  # traces a transformer
def test_spectral_norm_beside_fused_attention(tmp_path: Path, cli: Cli) -> None:
    """Traced without grad, attention is stored as the fused kernel: the legacy exporter
    fails, the dynamo route decomposes it, and the vdot of spectral_norm exports there too."""
    torch.manual_seed(0)
    model = SpectralAttention().eval()
    path = save_traced(model, torch.zeros(SHAPE), tmp_path / "sn_attn.ts.pt", grad=False)
    assert fused_kernels(path) == {"aten::_native_multi_head_attention", "aten::vdot"}
    doc = inspect(cli, path, SHAPE)
    assert doc["network"]["bounded"] is False  # attention is not globally Lipschitz
    rows = linear_rows(doc)
    exact = [exact_norm(effective_weight(model.inp)), exact_norm(model.attn.in_proj_weight.detach()),
             exact_norm(model.attn.out_proj.weight.detach()), exact_norm(model.head.weight.detach())]
    assert sorted(r["sigma"] for r in rows) == pytest.approx(sorted(exact), rel=1e-5)
    names = {r["name"]: r for r in rows}
    assert names["attn.out_proj"]["sigma"] == pytest.approx(exact[2], rel=1e-5)
    assert names["head"]["sigma"] == pytest.approx(exact[3], rel=1e-5)
    assert [r["sigma"] for r in rows if r.get("spectral_norm")] == pytest.approx([exact[0]], rel=1e-5)


def encoder_layer(**kwargs: object) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(EMBED, 2, 32, batch_first=True, **kwargs).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["pickled"] + [pytest.param(h, marks=pytest.mark.e2e) for h in  # traced: e2e
                                     ("traced", "traced-no-grad", "traced-no-grad-norm-first-gelu")])
def test_transformer_encoder_layer_every_linear_row(tmp_path: Path, cli: Cli, how: str) -> None:
    layer = encoder_layer(**({"norm_first": True, "activation": "gelu"} if "gelu" in how else {}))
    path = tmp_path / "enc.pt"
    if how == "pickled":
        torch.save(layer, path)  # the legacy exporter fails on its SDPA; torch.export takes it
    else:
        save_traced(layer, torch.zeros(SHAPE), path, grad="no-grad" not in how)
        fused = "aten::_transformer_encoder_layer_fwd" in fused_kernels(path)
        assert fused == ("no-grad" in how)
    doc = inspect(cli, path, SHAPE)
    assert doc["network"]["bounded"] is False
    rows = linear_rows(doc)
    exact = {name: exact_norm(w.detach()) for name, w in [
        ("in_proj", layer.self_attn.in_proj_weight), ("self_attn.out_proj", layer.self_attn.out_proj.weight),
        ("linear1", layer.linear1.weight), ("linear2", layer.linear2.weight)]}
    assert sorted(r["sigma"] for r in rows) == pytest.approx(sorted(exact.values()), rel=1e-5)
    by_name = {r["name"]: r["sigma"] for r in rows}
    for name in ("self_attn.out_proj", "linear1", "linear2"):
        assert by_name[name] == pytest.approx(exact[name], rel=1e-5)


def test_every_failed_step_is_named(tmp_path: Path, cli: Cli) -> None:
    """A scripted encoder layer (control flow, three optional inputs) defeats both exporters."""
    layer = encoder_layer()
    path = tmp_path / "enc.script.pt"
    torch.jit.save(torch.jit.script(layer), str(path))
    code, out, err = cli("inspect", path, "--input-shape", "1,4,16", "--trust", "--no-progress")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("lipcheck: error: cannot trace the model at input shape 1,4,16: ")
    assert "legacy exporter (opset 17): " in err and "; dynamo exporter (" in err
    assert "forward takes 4 arguments (src, src_mask, src_key_padding_mask, is_causal)" in err
    assert "\x1b[" not in err  # the dynamo exporter's colours are stripped
