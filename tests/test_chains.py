"""ECLipsE on Linear/activation chains (lipcheck.chains): never below the exact constant of small
ReLU networks or the largest Jacobian norm found by ascent, never above ECLipsE-Fast or the
product, on random and trained MLPs; any multipliers that pass the checks certify."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import fit_to_sine
from torch import nn

import lipcheck
from lipcheck import chains
from lipcheck.chains import certify, eclipse, eclipse_fast
from lipcheck.testing import lipsdp_neuron


def _mlp(act: type[nn.Module], seed: int, trained: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))
    return fit_to_sine(model, 12, 4, scale=2.0, steps=150) if trained else model.eval()


CASES = [(act, seed, trained) for act in (nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.Sigmoid)
         for seed, trained in ((0, False), (1, True))]
# each case runs the gradient ascent of --empirical: the trained ReLU and the random Tanh MLP in
# the fast layer, the other six in e2e
FAST_CASES = {(nn.ReLU, True), (nn.Tanh, False)}


@pytest.mark.parametrize("case", [c if (c[0], c[2]) in FAST_CASES else pytest.param(c, marks=pytest.mark.e2e)
                                  for c in CASES],
                         ids=[f"{c[0].__name__}-{'trained' if c[2] else 'random'}" for c in CASES])
def test_chain_bound_between_ascent_and_product(case):
    act, seed, trained = case
    model = _mlp(act, seed, trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = lipcheck.analyze(model, (1, 12), device="cpu", empirical=True)
    assert rep.network.composition in ("eclipse", "eclipse-fast")
    bound = rep.network.lipschitz_bound
    lower = rep.network.lipschitz_lower
    ws = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    product = math.prod(float(np.linalg.norm(w, 2)) for w in ws)
    assert lower is not None and lower <= bound <= product * (1 + 1e-6)


def test_eclipse_fast_exact_on_a_single_scalar_path():
    """1-D chain with ReLU: the constant is |w1 w2| exactly; ECLipsE-Fast gives it (to margin)."""
    value = eclipse_fast([np.array([[3.0]]), np.array([[-2.0]])], [(0.0, 1.0)])
    assert value is not None and value >= 6.0 and value == pytest.approx(6.0, rel=1e-6)


@pytest.mark.e2e  # an SDP solve
def test_lipsdp_reference_where_installed():
    pytest.importorskip("cvxpy")
    model = _mlp(nn.ReLU, 3, True)
    ws = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    sdp = lipsdp_neuron(ws)  # LipSDP-Neuron (Fazlyab et al. 2019), solved with cvxpy, as the reference
    fast = eclipse_fast(ws, [(0.0, 1.0)] * 2)
    assert fast is not None and fast >= sdp * (1 - 1e-4)
    found = eclipse(ws, [(0.0, 1.0)] * 2)
    assert found is not None and "per-neuron" in found[1]
    # a certificate of the LipSDP family: never below its optimum, and (the target)
    # within 1.10x of it, where ECLipsE-Fast is not
    assert sdp * (1 - 1e-4) <= found[0] <= 1.10 * sdp < fast


def _two_layer_exact(w1: np.ndarray, w2: np.ndarray) -> float:
    """The Lipschitz constant of x -> W2 relu(W1 x + b) when W1 has full row rank (every
    activation pattern D is realised on an open set): max over D in {0,1}^n of |W2 D W1|_2."""
    return max(float(np.linalg.norm(w2 @ np.diag(d) @ w1, 2))
               for d in itertools.product((0.0, 1.0), repeat=w1.shape[0]))


@pytest.mark.parametrize("seed", range(6))
def test_optimised_chain_never_below_the_exact_constant(seed):
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((6, 9)), rng.standard_normal((3, 6))
    exact = _two_layer_exact(w1, w2)
    fast = eclipse_fast([w1, w2], [(0.0, 1.0)])
    found = eclipse([w1, w2], [(0.0, 1.0)])
    assert fast is not None and found is not None
    assert exact * (1 - 1e-12) <= found[0] <= fast


@pytest.mark.parametrize("seed", range(4))
def test_any_multipliers_that_pass_certify(seed):
    """certify() with random positive per-neuron multipliers: either a check fails (None) or
    the value is a valid bound, so never below the exact constant; ECLipsE-Fast's scalar
    multipliers through certify() give eclipse_fast."""
    rng = np.random.default_rng(100 + seed)
    w1, w2 = rng.standard_normal((5, 8)), rng.standard_normal((4, 5))
    exact = _two_layer_exact(w1, w2)
    certified = 0
    lam_fast = 2.0 / float(np.linalg.eigvalsh(w1 @ w1.T)[-1])  # 1 / (2 m^2 mu), m = 1/2
    for _ in range(200):
        value = certify([w1, w2], [(0.0, 1.0)], [lam_fast * np.exp(rng.uniform(-3, 0.7, 5))])
        if value is not None:
            certified += 1
            assert value >= exact * (1 - 1e-12)
    assert certified > 20
    assert certify([w1, w2], [(0.0, 1.0)], [np.full(5, lam_fast)]) == pytest.approx(
        eclipse_fast([w1, w2], [(0.0, 1.0)]), rel=1e-12)
    assert certify([w1, w2], [(0.0, 1.0)], [np.full(5, -1.0)]) is None
    assert certify([w1, w2], [(0.0, 1.0)], [np.ones(4)]) is None  # wrong length


@pytest.mark.parametrize("slope", [(0.0, 1.0), pytest.param((0.01, 1.0), marks=pytest.mark.e2e),
                                   (-0.13, 1.13), pytest.param((0.0, 0.25), marks=pytest.mark.e2e)],
                         ids=["relu", "leaky", "gelu", "sigmoid"])
def test_optimised_between_ascent_and_fast_on_deeper_chains(slope):
    """Four layers, first wider than its input (the direct M) and narrower (Woodbury for p != 0):
    the optimised bound is at most ECLipsE-Fast's and at least a real Jacobian's norm."""
    torch.manual_seed(7)
    acts = {(0.0, 1.0): nn.ReLU, (0.01, 1.0): lambda: nn.LeakyReLU(0.01), (-0.13, 1.13): nn.GELU,
            (0.0, 0.25): nn.Sigmoid}
    for n_in in (5, 40):
        layers = [nn.Linear(n_in, 24), acts[slope](), nn.Linear(24, 16), acts[slope](), nn.Linear(16, 16),
                  acts[slope](), nn.Linear(16, 3)]
        model = nn.Sequential(*layers).double().eval()
        ws = [m.weight.detach().numpy() for m in model if isinstance(m, nn.Linear)]
        fast = eclipse_fast(ws, [slope] * 3)
        found = eclipse(ws, [slope] * 3)
        assert fast is not None and found is not None and found[0] <= fast
        lower = 0.0
        for k in range(20):
            x = torch.randn(n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            jac = torch.autograd.functional.jacobian(model, x)
            lower = max(lower, float(torch.linalg.matrix_norm(jac, 2)))
        assert found[0] >= lower


def test_optimisation_skipped_over_the_flop_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((6, 9)), rng.standard_normal((6, 6)), rng.standard_normal((3, 6))]
    monkeypatch.setattr(chains, "OPT_FLOPS", 1.0)
    found = eclipse(ws, [(0.0, 1.0)] * 2)
    assert found is not None and found[1].startswith("ECLipsE-Fast (per-neuron multipliers not tried")
    assert found[0] == eclipse_fast(ws, [(0.0, 1.0)] * 2)


@pytest.mark.parametrize("sample", ["mlp.onnx", "cnn.onnx"])
@pytest.mark.parametrize("mode", ["inference_mode", pytest.param("no_grad", marks=pytest.mark.e2e)])
def test_same_report_under_a_callers_grad_mode(sample: str, mode: str) -> None:
    """analyze() called inside torch.inference_mode() or torch.no_grad() (as an evaluation
    script would): the chain optimisation and the autograd adjoints still run, and the report
    is the one made outside."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "samples" / sample
    outside = lipcheck.analyze(path).to_dict()
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        inside = lipcheck.analyze(path).to_dict()
    for doc in (outside, inside):
        doc.pop("meta", None)
    assert inside == outside


def test_the_optimisation_budget_is_shared_by_the_networks_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Linear/ReLU/Linear branches added: each chain gets half of OPT_FLOPS, so the whole
    network's optimisation costs what one chain's would."""

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
            self.b = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    budgets: list[float] = []
    real = chains.eclipse

    def spy(weights, slopes, budget=None):  # type: ignore[no-untyped-def]
        budgets.append(budget)
        return real(weights, slopes, budget)

    monkeypatch.setattr(chains, "eclipse", spy)
    torch.manual_seed(0)
    rep = lipcheck.analyze(TwoBranches().eval(), (1, 6), device="cpu")
    assert budgets == [chains.OPT_FLOPS / 2] * 2
    assert rep.network.composition == "eclipse"
