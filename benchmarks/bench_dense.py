"""Dense certificates: ``lipcheck.analyze`` of an MLP with ``--certify auto`` vs ``exact``,
against an AutoLip-style peer (100 plain power steps per layer, float32, no certificate).

Per layer it also times the two upper bounds alone on the same matrix (the exact
Gram + Cholesky certificate after the float32 Lanczos estimate, vs the probabilistic bound
of one float64 Krylov run, which also gives the estimate) and prints the bounds next to the
exact float64 norm (SVD), so the price of each kind is visible. Every ratio is taken within
one run; the order of the analyses alternates over ``--repeats`` rounds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h
import torch

import lipcheck
from lipcheck import spectral

PEER_STEPS = 100


def peer(weights: Sequence[torch.Tensor]) -> float:
    """AutoLip-style (Virmaux & Scaman 2018): 100 power steps per layer, product of the
    estimates (no certificate)."""
    product = 1.0
    for w in weights:
        x = torch.randn(w.shape[1])
        for _ in range(PEER_STEPS):
            x = w.T @ (w @ x)
            x = x / torch.linalg.vector_norm(x)
        product *= float(torch.linalg.vector_norm(w @ x))
    return product


def main(argv: Sequence[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (auto, exact, peer), order alternating")
    ap.epilog = "--quick: MLP 784-1024-1024-1000 instead of 784-4096-4096-4096-1000"
    args = ap.parse_args(argv)
    device, facts, bw = h.start(args, "lipcheck benchmark (dense): --certify auto vs exact on an MLP", engine=False)
    name, model = h.mlp(args.quick)
    weights = [m.weight.detach().to(device) for m in model if isinstance(m, torch.nn.Linear)]
    t_run = time.perf_counter()
    times: dict[str, list[float]] = {"auto": [], "exact": [], "peer": []}
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        h.log(f"exporting {name} to ONNX ...")
        torch.onnx.export(model, (torch.zeros(1, weights[0].shape[1]),), str(path), dynamo=False, opset_version=17)
        lipcheck.analyze(path, device=device, tol=1e-2, max_iters=2)  # warm-up: imports, first calls
        for round_ in range(args.repeats):
            order = ["auto", "exact", "peer"] if round_ % 2 == 0 else ["peer", "exact", "auto"]
            for kind in order:
                h.log(f"round {round_ + 1}: {kind} ...")
                if kind == "peer":
                    _, t = h.timed(device, peer, weights)
                else:
                    reports[kind], t = h.timed(device, lambda k=kind: lipcheck.analyze(path, device=device, certify=k))
                times[kind].append(t)
    best = {k: min(v) for k, v in times.items()}
    print(f"(dense) lipcheck.analyze of {name} as ONNX, best of {args.repeats}:")
    for kind in ("auto", "exact", "peer"):
        label = {"auto": "analyze --certify auto", "exact": "analyze --certify exact",
                 "peer": f"peer ({PEER_STEPS} power steps/layer)"}[kind]
        print(f"  {label:<34}{best[kind]:>8.2f} s   x peer {best[kind] / best['peer']:.2f}   "
              f"(all: {', '.join(f'{t:.2f}' for t in times[kind])})")
    for kind in ("auto", "exact"):
        net = reports[kind].network
        print(f"  {kind}: network bound {net.lipschitz_bound:.6g} "
              f"({'certified' if net.certified else f'probabilistic, delta {net.failure_probability:.3g}'}), "
              f"estimate {net.lipschitz_estimate:.6g}")

    print("\n  per layer (bounds alone, the same matrix):")
    print(f"  {'shape':<12}{'exact norm':>12}{'cert':>12}{'t cert s':>10}{'prob':>12}{'t prob s':>10}{'k':>5}"
          f"{'t peer s':>10}")
    layers = []
    for w in weights:
        w64 = w.to(torch.float64)
        exact = float(torch.linalg.matrix_norm(w64, ord=2))
        cert, t_cert = h.timed(device, spectral.dense_bound, w64, spectral.Settings(certify="exact", device=device))
        prob, t_prob = h.timed(device, spectral.krylov_upper_bound, w64,
                               spectral.Settings(certify="probabilistic", device=device))
        _, t_peer = h.timed(device, peer, [w])
        p_val = prob.upper.value if prob is not None else float("nan")
        k = prob.estimate.iterations if prob is not None else 0
        print(f"  {'x'.join(map(str, w.shape)):<12}{exact:>12.7g}{cert.upper.value:>12.7g}{t_cert:>10.3f}"
              f"{p_val:>12.7g}{t_prob:>10.3f}{k:>5}{t_peer:>10.3f}")
        layers.append({"shape": list(w.shape), "exact": exact, "certified": cert.upper.value, "t_certified": t_cert,
                       "probabilistic": p_val, "t_probabilistic": t_prob, "krylov_steps": k, "t_peer": t_peer})
    section = {"part": "dense", "model": name, "times": times, "best": best,
               "ratio_auto_peer": best["auto"] / best["peer"], "ratio_exact_peer": best["exact"] / best["peer"],
               "layers": layers}
    h.write_json(args.json, args, facts, bw, [section], time.perf_counter() - t_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
