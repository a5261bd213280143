"""Network bounds on trained MLPs: the product of per-layer norms, ECLipsE-Fast alone,
lipcheck's certified bound (ECLipsE chains: per-neuron multipliers optimised from
ECLipsE-Fast's), LipSDP-Neuron (Fazlyab et al. 2019, solved with cvxpy where it is installed
and the problem is small enough), and the ``--empirical`` lower bound (a real Jacobian's
norm), with the time of each. The MLPs are trained here, seeded, on a synthetic task (no
dataset download): 32-64-64-10 and MNIST-sized 784-64-64-10 and 784-256-256-10.

LipSDP is run only up to --lipsdp-max-neurons hidden neurons (its SDP grows as their square;
the 128-neuron one took about 5 minutes with Clarabel on 2 cores).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np
import torch
from torch import nn

import lipcheck
from lipcheck.chains import eclipse_fast
from lipcheck.testing import lipsdp_neuron


def trained_mlp(widths: list[int], seed: int, steps: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(512, widths[0])
    y = (2.0 * x[:, : widths[-1]]).sin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


def run(name: str, model: nn.Sequential, n_in: int, tmp: Path, max_neurons: int) -> dict[str, Any]:
    path = tmp / f"{name}.onnx"
    torch.onnx.export(model, (torch.zeros(1, n_in),), str(path), dynamo=False, opset_version=17)
    ws = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    t = time.perf_counter()
    product = math.prod(float(np.linalg.norm(w, 2)) for w in ws)
    t_product = time.perf_counter() - t
    t = time.perf_counter()
    fast = eclipse_fast(ws, [(0.0, 1.0)] * (len(ws) - 1))
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    rep = lipcheck.analyze(path)
    t_lipcheck = time.perf_counter() - t
    t = time.perf_counter()
    low = lipcheck.analyze(path, empirical=True).network.lipschitz_lower
    t_lower = time.perf_counter() - t
    sdp, t_sdp = None, None
    neurons = sum(w.shape[0] for w in ws[:-1])
    if neurons <= max_neurons:
        try:
            t = time.perf_counter()
            sdp = lipsdp_neuron(ws)
            t_sdp = time.perf_counter() - t
        except ImportError:
            h.log("cvxpy is not installed (pip install -e '.[bench]'): no LipSDP column")
    return {"model": name, "product": product, "product_s": t_product, "eclipse_fast": fast, "eclipse_fast_s": t_fast,
            "lipcheck": rep.network.lipschitz_bound,
            "lipcheck_s": t_lipcheck, "composition": rep.network.composition, "lipsdp": sdp, "lipsdp_s": t_sdp,
            "lower": low, "lower_s": t_lower}


def main(argv: list[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.add_argument("--lipsdp-max-neurons", type=int, default=128,
                    help="solve LipSDP only for MLPs with at most this many hidden neurons")
    args = ap.parse_args(argv)
    _, facts, bw = h.start(args, "lipcheck benchmark (network bounds): product, lipcheck, LipSDP, lower bound",
                           engine=False)
    torch.set_grad_enabled(True)  # training and the lower bound's Jacobians
    t_run = time.perf_counter()
    models = [("mlp-32-64-64-10", trained_mlp([32, 64, 64, 10], 0, 300), 32),
              ("mlp-784-64-64-10", trained_mlp([784, 64, 64, 10], 2, 200), 784),
              ("mlp-784-256-256-10", trained_mlp([784, 256, 256, 10], 1, 200), 784)]
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, n_in in models:
            h.log(f"{name} ...")
            sections.append(run(name, model, n_in, Path(tmp), args.lipsdp_max_neurons))

    def cell(v: float | None, spec: str = ".4g") -> str:
        return "-" if v is None else format(v, spec)

    print(f"  {'model':<22}{'product':>10}{'ECL-Fast':>10}{'lipcheck':>10}{'LipSDP':>10}{'lower':>10}"
          f"{'lipcheck/LipSDP':>17}{'t lipcheck':>12}{'t LipSDP':>10}  composition")
    for s in sections:
        ratio = s["lipcheck"] / s["lipsdp"] if s["lipsdp"] and s["lipcheck"] else None
        print(f"  {s['model']:<22}{cell(s['product']):>10}{cell(s['eclipse_fast']):>10}{cell(s['lipcheck']):>10}"
              f"{cell(s['lipsdp']):>10}"
              f"{cell(s['lower']):>10}{cell(ratio, '.3f'):>17}{cell(s['lipcheck_s'], '.2f'):>12}"
              f"{cell(s['lipsdp_s'], '.1f'):>10}  {s['composition']}")
    h.write_json(args.json, args, facts, bw, sections, time.perf_counter() - t_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
