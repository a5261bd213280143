"""lipcheck.analyze side by side with what users run instead, in one process (issue 12).

For each model (ResNet-50 and MobileNetV3-small from torchvision, random init seeded,
exported to ONNX at 224x224; an MLP 784-4096-4096-4096-1000), timed after the imports:

* ``lipcheck.analyze(path)``, default settings: every row's estimate and upper bound and
  the network bound;
* the AutoLip-style peer (Virmaux & Scaman 2018): 100 steps of power iteration through
  every Conv2d/Linear at its real input size, adjoint by autograd, no certificate;
* exact SVD of each layer's reshaped weight (what ``torch.nn.utils.spectral_norm``
  normalises by; not the conv's operator norm);
* torch's one-step ``spectral_norm`` estimate of that reshaped weight, and its error;
* for convs, the Gram iteration of Delattre et al. 2023 (6 squarings) on the kernel's
  per-frequency matrices: a certified bound on the *circular* conv at the input size.

The peer's and lipcheck's per-layer estimates are compared (relative difference of the
conv/linear rows), and the ratio analyze / peer is printed and written (--json).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h
import torch
import torch.nn.functional as F
from torch import nn

import lipcheck
from lipcheck.formats import load
from lipcheck.pipeline import sha256_of

PEER_STEPS = 100
GRAM_STEPS = 6
GRAM_MAX_FLOPS = 2e8  # per layer: larger convs are left out of the Gram iteration


def mobilenet() -> tuple[str, nn.Module]:
    import torchvision  # the `bench` extra

    torch.manual_seed(h.SEED)
    return "mobilenet_v3_small", torchvision.models.mobilenet_v3_small(weights=None).eval()


def layers_with_inputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Every Conv2d/Linear with the shape of its input in one forward pass."""
    found: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: found.append((name, m, tuple(inp[0].shape)))))
    with torch.no_grad():
        model(example)
    for hk in hooks:
        hk.remove()
    return found


def _bias_free(mod: nn.Module) -> Any:
    if isinstance(mod, nn.Linear):
        return lambda x: F.linear(x, mod.weight)
    return lambda x: F.conv2d(x, mod.weight, stride=mod.stride, padding=mod.padding,
                              dilation=mod.dilation, groups=mod.groups)


def autolip_peer(layers: list[tuple[str, nn.Module, tuple[int, ...]]]) -> dict[str, float]:
    """Virmaux & Scaman's AutoLip: power iteration on AᵀA by autograd, 100 steps per layer."""
    out = {}
    gen = torch.Generator().manual_seed(h.SEED)
    for name, mod, shape in layers:
        fn = _bias_free(mod)
        x = torch.randn(shape, generator=gen)
        x = x / x.norm()
        sigma = 0.0
        with torch.enable_grad():
            for _ in range(PEER_STEPS):
                xr = x.detach().requires_grad_(True)
                y = fn(xr)
                (z,) = torch.autograd.grad(y, xr, grad_outputs=y.detach())
                sigma = float(y.detach().norm())
                x = z / z.norm().clamp_min(1e-30)
        out[name] = sigma
    return out


def reshaped(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def one_step_sn(w: torch.Tensor) -> float:
    """torch.nn.utils.spectral_norm at its first forward: one power step from a random u."""
    gen = torch.Generator().manual_seed(h.SEED)
    u = F.normalize(torch.randn(w.shape[0], generator=gen), dim=0)
    v = F.normalize(w.T @ u, dim=0)
    u = F.normalize(w @ v, dim=0)
    return float(u @ (w @ v))


def gram_iteration_conv(mod: nn.Conv2d, shape: tuple[int, ...]) -> float:
    """Delattre et al. 2023: ||G_t||_F^(1/2^t) over the per-frequency kernel matrices of the
    circular conv on the input's grid (stride ignored: a bound on the stride-1 conv, which
    subsampling only lowers). Grouped convs: per group."""
    w = mod.weight.detach().to(torch.float64)
    n1, n2 = shape[2], shape[3]
    if w.shape[2] > n1 or w.shape[3] > n2:
        return math.nan
    g = mod.groups
    small, big = sorted((w.shape[0] // g, w.shape[1]))
    if 8 * n1 * n2 * g * small**2 * big > GRAM_MAX_FLOPS:
        return math.nan  # not cheap: left out (shown in the count); checked before the DFT's memory
    k = torch.fft.fft2(w, s=(n1, n2))  # (out, in_g, n1, n2)
    k = k.reshape(g, w.shape[0] // g, w.shape[1], n1 * n2).permute(0, 3, 1, 2).reshape(-1, w.shape[0] // g,
                                                                                      w.shape[1])
    if k.shape[-2] > k.shape[-1]:
        k = k.mH  # the same singular values; the squarings act on the smaller side
    log_scale = torch.zeros(k.shape[0], dtype=torch.float64)
    for _ in range(GRAM_STEPS):
        f = torch.linalg.matrix_norm(k, "fro").clamp_min(1e-300)
        k = k / f[:, None, None]
        log_scale = (log_scale + torch.log(f)) * 2
        k = k.mH @ k
    f = torch.linalg.matrix_norm(k, "fro").clamp_min(1e-300)
    return float(torch.exp((log_scale + torch.log(f)) / 2**GRAM_STEPS).max())


def run_model(name: str, model: nn.Module, example: torch.Tensor, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{name}.onnx"
    h.log(f"{name}: exporting to ONNX ...")
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
    layers = layers_with_inputs(model, example)

    h.log(f"{name}: lipcheck.analyze ...")
    t = time.perf_counter()
    report = lipcheck.analyze(path)
    t_analyze = time.perf_counter() - t
    # the floor every run pays before any estimate: reading the file (and its digest)
    t = time.perf_counter()
    load(path)
    sha256_of(path)
    t_load = time.perf_counter() - t

    h.log(f"{name}: AutoLip-style peer ({len(layers)} layers x {PEER_STEPS} steps) ...")
    t = time.perf_counter()
    peer = autolip_peer(layers)
    t_peer = time.perf_counter() - t

    t = time.perf_counter()
    exact = {n: float(torch.linalg.matrix_norm(reshaped(m).double(), ord=2)) for n, m, _ in layers}
    t_svd = time.perf_counter() - t
    t = time.perf_counter()
    sn = {n: one_step_sn(reshaped(m)) for n, m, _ in layers}
    t_sn = time.perf_counter() - t
    sn_err = max(abs(sn[n] - exact[n]) / exact[n] for n in exact if exact[n] > 0)
    convs = [(n, m, s) for n, m, s in layers if isinstance(m, nn.Conv2d)]
    t = time.perf_counter()
    gram = {n: gram_iteration_conv(m, s) for n, m, s in convs}
    gram_done = sum(math.isfinite(v) for v in gram.values())
    t_gram = time.perf_counter() - t

    # lipcheck rows of the conv/linear ops, in graph order, against the peer's layers in module order
    rows = [r for r in report.layers if r.op in ("Conv", "Gemm", "MatMul") and r.sigma is not None]
    diffs, gram_over = [], []
    # each method's largest relative distance from lipcheck's estimate (a lower bound converged
    # to the tolerance) over the layers; lipcheck's own is its bracket (upper - estimate) / estimate
    errors: dict[str, float] = {}
    if len(rows) == len(layers):
        for r, (n, _, _) in zip(rows, layers):
            if r.sigma and peer[n]:
                diffs.append((r.sigma - peer[n]) / r.sigma)
            if n in gram and r.sigma_upper and math.isfinite(gram[n]):
                gram_over.append(gram[n] / r.sigma_upper)
            if not r.sigma:
                continue
            for method, value in (("peer", peer[n]), ("svd_reshaped", exact[n]), ("sn_one_step", sn[n]),
                                  ("gram_iteration", gram.get(n, math.nan)),
                                  ("lipcheck", r.sigma_upper if r.sigma_upper is not None else math.nan)):
                if math.isfinite(value):
                    errors[method] = max(errors.get(method, 0.0), abs(value - r.sigma) / r.sigma)
    net = report.network
    return {"model": name, "layers": len(layers), "analyze_s": t_analyze, "peer_s": t_peer,
            "ratio_analyze_over_peer": t_analyze / t_peer, "load_s": t_load, "load_over_peer": t_load / t_peer,
            "iterations": sum(r.iterations or 0 for r in report.layers),
            "max_rel_error_vs_lipcheck_estimate": errors,
            "svd_reshaped_s": t_svd, "sn_one_step_s": t_sn,
            "sn_one_step_max_rel_err_vs_reshaped_svd": sn_err, "gram_iteration_conv_s": t_gram,
            "gram_iteration_convs": f"{gram_done}/{len(convs)}",
            "lipcheck_minus_peer_rel": {"max": max(diffs, default=None), "min": min(diffs, default=None),
                                        "rows_matched": len(diffs)},
            "gram_iteration_over_lipcheck_upper": {"max": max(gram_over, default=None),
                                                   "min": min(gram_over, default=None)},
            "lipschitz_bound": net.lipschitz_bound, "lipschitz_estimate": net.lipschitz_estimate,
            "upper_kinds": sorted({str(r.upper_kind) for r in report.layers if r.sigma_upper is not None})}


def main(argv: Sequence[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.add_argument("--models", default="resnet50,mobilenet_v3_small,mlp",
                    help="comma-separated subset of resnet50, mobilenet_v3_small, mlp")
    ap.add_argument("--plot", default=None,
                    help="PNG of time against error (default: next to --json; needs matplotlib, the bench extra)")
    ap.epilog = "--quick: ResNet-18 and the MLP 784-1024-1024-1000 instead of ResNet-50 and the MLP-4096"
    args = ap.parse_args(argv)
    _, facts, bw = h.start(args, "lipcheck benchmark (peers): analyze vs AutoLip-style power iteration",
                           engine=False)
    wanted = args.models.split(",")
    image = torch.zeros(1, 3, 224, 224)
    models: list[tuple[str, nn.Module, torch.Tensor]] = []
    if "resnet50" in wanted:
        models.append((*h.resnet(args.quick), image))
    if "mobilenet_v3_small" in wanted:
        models.append((*mobilenet(), image))
    if "mlp" in wanted:
        models.append((*h.mlp(args.quick), torch.zeros(1, 784)))
    t_run = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        # first calls (imports inside lipcheck, kernels) paid on a tiny model, untimed
        _, tiny = h.mlp(True)
        torch.onnx.export(tiny, (torch.zeros(1, 784),), str(Path(tmp) / "warm.onnx"), dynamo=False)
        lipcheck.analyze(Path(tmp) / "warm.onnx", tol=1e-2, max_iters=2)
        for name, model, example in models:
            sections.append(run_model(name, model, example, Path(tmp)))
    print(f"  {'model':<30}{'layers':>7}{'analyze s':>11}{'peer s':>9}{'ratio':>7}{'svd(resh) s':>13}"
          f"{'sn-1step err':>14}{'gram-it s':>11}{'lipcheck-peer':>22}")
    for s in sections:
        d = s["lipcheck_minus_peer_rel"]
        spread = "-" if d["max"] is None else f"{d['min']:+.1e}..{d['max']:+.1e}"
        print(f"  {s['model']:<30}{s['layers']:>7}{s['analyze_s']:>11.2f}{s['peer_s']:>9.2f}"
              f"{s['ratio_analyze_over_peer']:>7.2f}{s['svd_reshaped_s']:>13.2f}"
              f"{s['sn_one_step_max_rel_err_vs_reshaped_svd']:>14.2e}{s['gram_iteration_conv_s']:>11.2f}{spread:>22}")
    print("  lipcheck-peer: (lipcheck estimate - peer estimate) / lipcheck estimate per conv/linear row "
          "(> 0: the peer's 100 steps had not converged; a conv with an eval BatchNorm folded into its\n"
          "  row differs by the BatchNorm's scale, e.g. 1/sqrt(1 + 1e-3) for a fresh MobileNetV3 BN)")
    print("  floor: reading the file alone (lipcheck's loader and digest), as a fraction of the peer: "
          + ", ".join(f"{s['model']} {s['load_s']:.2f} s = {s['load_over_peer']:.2f}" for s in sections))
    h.write_json(args.json, args, facts, bw, sections, time.perf_counter() - t_run)
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        draw(sections, Path(plot))
    return 0


def draw(sections: list[dict[str, Any]], path: Path) -> None:
    """Time against error, one marker per method, one colour per model (log-log); needs the
    optional matplotlib (``pip install -e '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        h.log(f"matplotlib is not installed: no plot ({path}); pip install -e '.[bench]'")
        return
    times = {"lipcheck": "analyze_s", "peer": "peer_s", "svd_reshaped": "svd_reshaped_s",
             "sn_one_step": "sn_one_step_s", "gram_iteration": "gram_iteration_conv_s"}
    labels = {"lipcheck": "lipcheck analyze (error: its certified bracket)", "peer": "AutoLip-style, 100 steps",
              "svd_reshaped": "SVD of reshaped weights", "sn_one_step": "spectral_norm, one step",
              "gram_iteration": "Gram iteration (circular conv)"}
    markers = {"lipcheck": "*", "peer": "o", "svd_reshaped": "s", "sn_one_step": "v", "gram_iteration": "D"}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    handles: list[Any] = []
    for i, s in enumerate(sections):
        color = f"C{i}"
        for method, err in s["max_rel_error_vs_lipcheck_estimate"].items():
            seconds = s[times[method]]
            if seconds > 0:
                ax.scatter(seconds, max(err, 1e-9), marker=markers[method], color=color, s=70)
        handles.append(Patch(color=color, label=s["model"]))
    for method, marker in markers.items():
        handles.append(ax.scatter([], [], color="gray", marker=marker, label=labels[method]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds (2 CPU cores; lipcheck includes loading the ONNX file)")
    ax.set_ylabel("largest relative distance from lipcheck's estimate")
    ax.set_title("Per-layer spectral norms: time against error")
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    h.log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
