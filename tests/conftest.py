"""What every test file shares: paths, the in-process CLI runner, one torch thread, seeded
tensors, exact norms and explicit Jacobians, the golden-file switch and the ``e2e`` layer.

Plain helpers are imported by name (``from conftest import SAMPLES, exact_norm``; pytest puts
this folder on ``sys.path``); fixtures are requested as arguments (``cli``, ``samples``,
``overwrite_golden``).

The suite has two layers (README: ``python -m pytest -q`` runs both):

* ``python -m pytest -m "not e2e" -q``: the numerics against exact answers, the rules, the
  gates, the writers, the golden reports and the in-process CLI (under a minute on 2 cores);
* ``-m e2e``: whatever starts a Python subprocess or runs a whole workflow (normalize then
  diff, the documented CI commands, ``torch.export``). Tests marked ``slow`` are ``e2e`` too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
GOLDEN = Path(__file__).resolve().parent / "golden"


# --------------------------------------------------------------------------- options and layers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--overwrite-golden", action="store_true", default=False,
                     help="rewrite tests/golden/* from the current output instead of comparing "
                          "(the same as LIPCHECK_REGEN_GOLDEN=1)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that needs a minute or gigabytes is never part of the fast layer.
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def overwrite_golden(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("--overwrite-golden") or os.environ.get("LIPCHECK_REGEN_GOLDEN"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the whole session, and (unless OMP_NUM_THREADS says otherwise)
    in every ``python -m lipcheck`` the tests start. The tensors here are small, so a second
    thread buys nothing, and on a loaded 2-core machine OpenMP's spinning threads make runs
    several times slower (a 0.05 s inspect took 5 s; test_cli.py went from 50 s to 7 s).
    The numbers are the same either way: the sample reports are byte-identical at 1 and 2
    threads."""
    before = torch.get_num_threads()
    env_before = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)
    if env_before is None:
        os.environ.pop("OMP_NUM_THREADS", None)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


# --------------------------------------------------------------------------- the CLI, in-process


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> CliResult:
    """``lipcheck ARGS`` in this process: exit code, stdout and stderr."""
    from lipcheck.cli import run

    capsys.readouterr()  # drop whatever an earlier step printed
    code = run([str(a) for a in args])
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


Cli = Callable[..., CliResult]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``cli("inspect", path, "-f", "json")`` -> (code, out, err). Unknown exceptions become
    exit 3 with one line, as for a user: LIPCHECK_DEBUG is unset for the test."""
    monkeypatch.delenv("LIPCHECK_DEBUG", raising=False)

    def invoke(*args: object) -> CliResult:
        return run_cli(list(args), capsys)

    return invoke


# --------------------------------------------------------------------------- seeded tensors


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal entries from a private generator: the same tensor on every run."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols)."""
    q, _ = torch.linalg.qr(randn(rows, cols, seed=seed))
    return q


def with_singular_values(svals: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ with seeded orthonormal U, V: its singular values are exactly ``svals``."""
    u, v = orthonormal(rows, len(svals), seed), orthonormal(cols, len(svals), seed + 1)
    return u @ torch.diag(torch.tensor(svals, dtype=torch.float64)) @ v.T


# --------------------------------------------------------------------------- exact references


def exact_norm(mat: torch.Tensor) -> float:
    """Largest singular value by SVD, in float64 (complex stays complex); the max over a
    leading batch, if any."""
    if not mat.is_complex():
        mat = mat.to(torch.float64)
    return float(torch.linalg.matrix_norm(mat, ord=2).max())


def jacobian_at(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The (out_numel, in_numel) Jacobian of ``fn`` at ``x``, by autograd (batched with vmap)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jac = torch.autograd.functional.jacobian(fn, x, vectorize=True)
    return jac.reshape(-1, x.numel())


def jacobian_matrix(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The explicit matrix of a linear map on float64 inputs of ``shape`` (its Jacobian at 0)."""
    return jacobian_at(fn, torch.zeros(shape, dtype=torch.float64))


def fit_to_sine(model: torch.nn.Module, n_in: int, n_out: int, scale: float, steps: int) -> torch.nn.Module:
    """Train ``model`` with Adam (lr 1e-2) on 256 random inputs x to sin(scale * x[:, :n_out]),
    drawing the data from torch's global generator (seed it first): a "trained" network with
    the structured weights training gives, built in a second. Returns it in eval mode."""
    x = torch.randn(256, n_in)
    y = (x[:, :n_out] * scale).sin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


def llama_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16, d: int = 32, f: int = 48, v: int = 40,
                  blocks: int = 2) -> dict[str, torch.Tensor]:
    """A seeded Llama-shaped state: embedding, lm_head, final norm, and per block q (d x d),
    grouped-query k/v (d/2 x d), o, gate/up (f x d), down (d x f) and the input norm."""
    import math

    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(v, d, generator=g),
         "lm_head.weight": torch.randn(v, d, generator=g), "model.norm.weight": torch.ones(d)}
    for i in range(blocks):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d // 2, d)),
                            ("self_attn.v_proj", (d // 2, d)), ("self_attn.o_proj", (d, d)),
                            ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)), ("mlp.down_proj", (d, f))):
            t[p + name + ".weight"] = torch.randn(*shape, generator=g) / math.sqrt(d)
        t[p + "input_layernorm.weight"] = torch.ones(d)
    return {k: val.to(dtype) for k, val in t.items()}
