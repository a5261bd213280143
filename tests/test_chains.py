"""ECLipsE-Fast on Linear/activation chains (lipcheck.chains): never below the largest Jacobian
norm found by ascent, never above the product, on random and trained MLPs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import fit_to_sine
from torch import nn

import lipcheck
from lipcheck.chains import eclipse_fast
from lipcheck.testing import lipsdp_neuron


def _mlp(act: type[nn.Module], seed: int, trained: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))
    return fit_to_sine(model, 12, 4, scale=2.0, steps=150) if trained else model.eval()


CASES = [(act, seed, trained) for act in (nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.Sigmoid)
         for seed, trained in ((0, False), (1, True))]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].__name__}-{'trained' if c[2] else 'random'}" for c in CASES])
def test_chain_bound_between_ascent_and_product(case):
    act, seed, trained = case
    model = _mlp(act, seed, trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = lipcheck.analyze(model, (1, 12), device="cpu", empirical=True)
    assert rep.network.composition == "eclipse-fast"
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
