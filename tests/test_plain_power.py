"""``lipcheck.testing.plain_power``, the reference the benchmarks measure the engine against,
checked against exact answers: matrices with known singular values (``with_singular_values``)."""

from __future__ import annotations

import torch
from conftest import randn, with_singular_values

from lipcheck.testing import plain_power


def _gram(w: torch.Tensor):
    def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = w @ x
        return y, w.T @ y

    return gram


def _unit(n: int, seed: int) -> torch.Tensor:
    x = randn(n, seed=seed)
    return x / torch.linalg.vector_norm(x)


def test_converges_to_the_norm_with_a_gap():
    w = with_singular_values([3.0, 1.5, 1.0, 0.5], 40, 30, seed=1)
    est = plain_power(_gram(w), _unit(30, 2), tol=1e-12)
    assert est.converged
    assert 3.0 * (1 - 1e-10) <= est.sigma <= 3.0 * (1 + 1e-12)


def test_its_own_stop_is_short_of_the_norm_on_a_cluster_and_the_oracle_stop_is_not():
    """Relative change below tol is not accuracy tol; told the answer, it stops at the first
    step within tol of it, a step the unaided test does not know to wait for."""
    w = with_singular_values([1.0, 0.999, 0.998, 0.5], 60, 50, seed=3)
    own = plain_power(_gram(w), _unit(50, 4), tol=1e-6)
    oracle = plain_power(_gram(w), _unit(50, 4), tol=1e-6, target=1.0)
    assert own.converged and own.sigma < 1.0 * (1 - 1e-6)
    assert oracle.converged and 1.0 * (1 - 1e-6) <= oracle.sigma <= 1.0 * (1 + 1e-12)
    assert oracle.iterations > own.iterations


def test_gives_up_honestly_and_knows_the_zero_map():
    w = with_singular_values([1.0, 1.0 - 1e-9], 20, 20, seed=5)
    est = plain_power(_gram(w), _unit(20, 6), tol=1e-12, max_iters=3, target=2.0)
    assert not est.converged and est.iterations == 3 and est.sigma <= 1.0 + 1e-12
    zero = plain_power(_gram(torch.zeros(5, 4, dtype=torch.float64)), _unit(4, 7), tol=1e-6)
    assert zero == (0.0, 1, True)
