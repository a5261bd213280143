"""Reshaped weight matrices: lipcheck's estimates against exact SVD and plain power iteration.

Every Linear and Conv weight of a seeded ResNet and MLP, reshaped to (out, -1), the matrix
torch's spectral_norm divides by. Rows: the exact norm (``torch.linalg.matrix_norm``), plain
power iteration (``lipcheck.testing.plain_power``) by its own stopping test and stopped by an
oracle at the accuracy asked for, and ``spectral.matrix_estimate`` with power and Lanczos.
``python benchmarks/bench_matrices.py --help`` lists the options; benchmarks/README.md
explains the columns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import _harness as h
import torch
from torch import nn

from lipcheck import spectral
from lipcheck.testing import PowerEstimate, plain_power

TOLS = (1e-4, 1e-6)


def weight_matrices(model: nn.Module, device: str) -> list[tuple[str, torch.Tensor]]:
    mats = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = mod.weight.detach().to(device=device, dtype=torch.float32)
            mats.append((name, w.reshape(w.shape[0], -1).contiguous()))
    return mats


def gram(w: torch.Tensor) -> h.Gram:
    def apply(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = w @ x
        return y, w.T @ y

    return apply


def measure(model_name: str, model: nn.Module, device: str, gbs: float) -> dict[str, Any]:
    mats = weight_matrices(model, device)
    # A gram step Aᵀ(Ax) streams the weight twice; the vectors are negligible next to it.
    layer_bytes = [2 * w.numel() * w.element_size() for _, w in mats]
    exact_now = {"sigma": 0.0}  # the exact norm of the matrix being measured, set by the exact row

    def exact(w: torch.Tensor) -> PowerEstimate:
        exact_now["sigma"] = float(torch.linalg.matrix_norm(w, ord=2))
        return PowerEstimate(exact_now["sigma"], 0, True)

    def plain(w: torch.Tensor, tol: float, oracle: bool) -> PowerEstimate:
        return plain_power(gram(w), h.start_vector((w.shape[1],), device), tol, h.MAX_ITERS,
                           target=exact_now["sigma"] if oracle else None)

    def engine(w: torch.Tensor, tol: float, method: str) -> spectral.Estimate:
        return spectral.matrix_estimate(w, h.settings(tol, device, method))

    # The exact row runs first on each matrix: the oracle row reads its answer.
    jobs: list[h.Job] = [(h.Row("a", model_name, "exact (matrix_norm)", None), exact)]
    for tol in TOLS:
        jobs.append((h.Row("a", model_name, "plain power", tol), partial(plain, tol=tol, oracle=False)))
        jobs.append((h.Row("a", model_name, h.ORACLE, tol), partial(plain, tol=tol, oracle=True)))
        for m in ("power", "lanczos"):
            jobs.append((h.Row("a", model_name, f"lipcheck {m}", tol), partial(engine, tol=tol, method=m)))

    weights = [w for _, w in mats]
    smallest = min(range(len(weights)), key=lambda i: weights[i].numel())
    h.run_jobs(weights, jobs, device, smallest, lambda i, w: f"(a) {model_name} {mats[i][0]} {tuple(w.shape)}")
    rows = [r for r, _ in jobs]
    h.finish(rows, rows[0].sigmas, layer_bytes, gbs, exact=rows[0])
    return {
        "part": "a", "model": model_name,
        "layers": [{"name": n, "shape": list(w.shape)} for n, w in mats],
        "weight_bytes": sum(w.numel() * w.element_size() for _, w in mats),
        "bytes_per_iter": sum(layer_bytes), "floor_per_iter_s": sum(layer_bytes) / (gbs * 1e9),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.epilog = "--quick: ResNet-18 and an MLP 784-1024-1024-1000 instead of ResNet-50 and 784-4096x3-1000"
    args = ap.parse_args(argv)
    device, facts, bw = h.start(args, "lipcheck benchmark (a): reshaped weight matrices")
    sections = []
    t_run = time.perf_counter()
    for name, model in (h.resnet(args.quick), h.mlp(args.quick)):
        h.log(f"model {name}")
        sec = measure(name, model.to(device), device, bw["read_gbs"])
        h.print_rows(f"(a) {name}: {len(sec['layers'])} reshaped weights, {sec['weight_bytes'] / 1e6:.1f} MB; one gram "
                     f"step over all reads {sec['bytes_per_iter'] / 1e6:.1f} MB -> floor "
                     f"{sec['floor_per_iter_s'] * 1e3:.2f} ms/iter", sec["rows"], "max rel err vs exact")
        print()
        sections.append(sec)
    h.write_json(args.json, args, facts, bw, sections, time.perf_counter() - t_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
