"""Benchmark of lipcheck's spectral-norm estimates against exact SVD and plain power iteration.

Run ``python benchmarks/bench_spectral.py --help`` for the options; benchmarks/README.md explains
the columns. Every number comes from one process so that ratios are taken under the same machine
load: compare numbers within one run, never across runs or machines.

Part (a): every Linear/Conv weight reshaped to (out, -1), the matrix lipcheck estimates by default.
Part (b): the true operator norm of each bias-free Conv2d as a map on the input size it sees at a
224x224 image, which is what a Lipschitz bound of the network actually needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lipcheck import spectral

MAX_ITERS = 5000
ORACLE_MAX_ITERS = 3000  # plain power to a given accuracy on conv operators can need more: capped, flagged
REFERENCE_TOL = 1e-9
SEED = 0
# The bandwidth probe must be far larger than any cache so it measures DRAM (or HBM), not L3.
PROBE_BYTES = 256 * 2**20
PROBE_REPEATS = 5

Gram = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    # CUDA kernels are asynchronous: without a sync the clock would stop before the work ends.
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - t0


def start_vector(shape: Sequence[int], device: str) -> torch.Tensor:
    # Same recipe as lipcheck.spectral.start_vector (float64 draw on the CPU, seed 0), so the
    # reference and the engine's power method start from the same vector and any difference in
    # iterations comes from the loops themselves, not from the luck of the start.
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=torch.float32)
    return x / torch.linalg.vector_norm(x)


@dataclass
class Estimate:
    sigma: float
    iterations: int
    converged: bool


def plain_power(gram: Gram, x: torch.Tensor, tol: float, max_iters: int = MAX_ITERS,
                target: float | None = None) -> Estimate:
    """Textbook power iteration on AᵀA, the reference the engine is measured against.

    ``gram(x)`` returns (A x, Aᵀ A x). sigma is estimated as ||A x|| for the unit iterate x; the
    loop stops when that estimate changes by less than ``tol`` relative to itself, or, given the
    true value as ``target`` (an oracle no real run has), as soon as sigma is within ``tol`` of it:
    the fewest steps plain power iteration could take to that accuracy.
    """
    prev = 0.0
    sigma = 0.0
    for it in range(1, max_iters + 1):
        y, z = gram(x)
        sigma = float(torch.linalg.vector_norm(y))  # the one host sync per step
        if sigma == 0.0:
            return Estimate(0.0, it, True)
        if target is not None:
            if sigma >= target * (1 - tol):
                return Estimate(sigma, it, True)
        elif abs(sigma - prev) < tol * sigma:
            return Estimate(sigma, it, True)
        prev = sigma
        x = z / torch.linalg.vector_norm(z)
    return Estimate(sigma, max_iters, False)


def engine_settings(tol: float, device: str, method: str | None) -> tuple[spectral.Settings, str]:
    """lipcheck Settings for ``method``, and the label of the row it produces.

    Older lipcheck versions have no ``method`` field; then the engine's default loop is measured
    once under the label "lipcheck (default)", so the script runs on either version.
    """
    common: dict[str, Any] = dict(tol=tol, max_iters=MAX_ITERS, seed=SEED, device=device, dtype=torch.float32)
    if method is not None:
        try:
            return spectral.Settings(**common, method=method), f"lipcheck {method}"
        except TypeError:
            pass
    return spectral.Settings(**common), "lipcheck (default)"


def engine_methods(device: str) -> list[str | None]:
    """The engine methods to measure: power and lanczos, or just the default on old versions."""
    _, label = engine_settings(1e-4, device, "power")
    return [None] if label == "lipcheck (default)" else ["power", "lanczos"]


# --------------------------------------------------------------------------- machine facts


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return facts


def measure_bandwidth(device: str) -> dict[str, float]:
    """Best-of-N GB/s for a large copy (read+write) and a large sum (read only).

    The sum's figure is used for the floors: a matvec streams the weight once and writes a vector
    that is tiny next to it, so it is read-bound like a reduction.
    """
    n = PROBE_BYTES // 4
    src = torch.rand(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults would otherwise land in the first timed repeat
    float(src.sum())
    best_copy = math.inf
    best_sum = math.inf
    for _ in range(PROBE_REPEATS):
        _, t = timed(device, dst.copy_, src)
        best_copy = min(best_copy, t)
        _, t = timed(device, lambda: float(src.sum()))
        best_sum = min(best_sum, t)
    return {
        "probe_mb": PROBE_BYTES / 2**20,
        "copy_gbs": 2 * PROBE_BYTES / best_copy / 1e9,  # copy reads and writes every byte
        "read_gbs": PROBE_BYTES / best_sum / 1e9,
    }


# --------------------------------------------------------------------------- models


def build_models(quick: bool) -> list[tuple[str, nn.Module]]:
    torch.manual_seed(SEED)
    resnet = (torchvision.models.resnet18 if quick else torchvision.models.resnet50)(weights=None).eval()
    widths = [784, 1024, 1024, 1000] if quick else [784, 4096, 4096, 4096, 1000]
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    mlp = nn.Sequential(*layers).eval()
    mlp_name = "mlp-" + "-".join(map(str, widths))
    return [("resnet18" if quick else "resnet50", resnet), (mlp_name, mlp)]


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One method at one tolerance over all layers of one part of one model."""

    part: str
    model: str
    method: str
    tol: float | None
    time_s: float = 0.0
    iterations: int = 0
    not_converged: int = 0
    max_rel_err: float | None = None  # vs exact (a) or vs the reference estimate (b)
    x_exact: float | None = None  # t_exact / t: > 1 means faster than exact
    x_plain: float | None = None  # t_plain(same tol) / t: > 1 means faster than plain power
    x_oracle: float | None = None  # t / t of plain power stopped at the same accuracy (oracle)
    floor_s: float | None = None  # bandwidth floor for the iterations this method used
    sigmas: list[float] = field(default_factory=list)
    layer_iters: list[int] = field(default_factory=list)


ORACLE = "plain power, oracle stop"


def fill_ratios(rows: list[Row], exact: Row | None) -> None:
    plain = {r.tol: r for r in rows if r.method == "plain power"}
    oracle = {r.tol: r for r in rows if r.method == ORACLE}
    for r in rows:
        if exact is not None and r is not exact and r.time_s > 0:
            r.x_exact = exact.time_s / r.time_s
        p = plain.get(r.tol)
        if p is not None and r.time_s > 0 and r.tol is not None:
            r.x_plain = p.time_s / r.time_s
        o = oracle.get(r.tol)
        if o is not None and r.time_s > 0 and r.tol is not None:
            r.x_oracle = o.time_s / r.time_s


def rel_err(values: Sequence[float], ref: Sequence[float]) -> float:
    return max((abs(v - t) / t if t > 0 else abs(v)) for v, t in zip(values, ref))


# --------------------------------------------------------------------------- part (a)


def weight_matrices(model: nn.Module, device: str) -> list[tuple[str, torch.Tensor]]:
    mats = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = mod.weight.detach().to(device=device, dtype=torch.float32)
            mats.append((name, w.reshape(w.shape[0], -1).contiguous()))
    return mats


def matrix_gram(w: torch.Tensor) -> Gram:
    def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = w @ x
        return y, w.T @ y

    return gram


def part_a(model_name: str, model: nn.Module, device: str, tols: Sequence[float], bw: float) -> dict[str, Any]:
    mats = weight_matrices(model, device)
    # A gram step A^T(Ax) streams the weight twice; the vectors are negligible next to it.
    layer_bytes = [2 * w.numel() * w.element_size() for _, w in mats]
    methods = engine_methods(device)

    exact_now: dict[str, float] = {}  # the exact norm of the matrix being measured (set by run_exact)

    def run_plain(w: torch.Tensor, tol: float, oracle: bool = False) -> Estimate:
        target = exact_now["sigma"] if oracle else None
        return plain_power(matrix_gram(w), start_vector((w.shape[1],), device), tol, target=target)

    def run_engine(w: torch.Tensor, tol: float, method: str | None) -> Estimate:
        est = spectral.matrix_estimate(w, engine_settings(tol, device, method)[0])
        return Estimate(est.sigma, est.iterations, est.converged)

    def run_exact(w: torch.Tensor) -> Estimate:
        exact_now["sigma"] = float(torch.linalg.matrix_norm(w, ord=2))
        return Estimate(exact_now["sigma"], 0, True)

    # One (row, callable) per method and tol; the callable measures it on one matrix.
    jobs: list[tuple[Row, Callable[[torch.Tensor], Estimate]]] = [
        (Row("a", model_name, "exact (matrix_norm)", None), run_exact)
    ]
    for tol in tols:
        jobs.append((Row("a", model_name, "plain power", tol), lambda w, t=tol: run_plain(w, t)))
        jobs.append((Row("a", model_name, ORACLE, tol), lambda w, t=tol: run_plain(w, t, True)))
        for m in methods:
            label = engine_settings(tol, device, m)[1]
            jobs.append((Row("a", model_name, label, tol), lambda w, t=tol, mm=m: run_engine(w, t, mm)))

    # Warm-up on the smallest matrix: first-call costs (thread pools, LAPACK init) are not the
    # steady-state cost being compared.
    smallest = min(mats, key=lambda nw: nw[1].numel())[1]
    for _, fn in jobs:
        fn(smallest)

    # Layer-major order (every method on layer 1, then layer 2, ...) spreads load fluctuations of
    # a shared machine over all methods instead of penalising whichever ran during a burst.
    for i, (_, w) in enumerate(mats):
        for row, fn in jobs:
            est, t = timed(device, fn, w)
            row.time_s += t
            row.iterations += est.iterations
            row.not_converged += 0 if est.converged else 1
            row.sigmas.append(est.sigma)
            row.layer_iters.append(est.iterations)
        if (i + 1) % 10 == 0 or i + 1 == len(mats):
            log(f"  (a) {model_name}: {i + 1}/{len(mats)} weights")

    rows = [r for r, _ in jobs]
    exact = rows[0]
    for r in rows[1:]:
        r.max_rel_err = rel_err(r.sigmas, exact.sigmas)
        r.floor_s = sum(it * b for it, b in zip(r.layer_iters, layer_bytes)) / (bw * 1e9)
    fill_ratios(rows, exact)
    return {
        "part": "a",
        "model": model_name,
        "layers": [{"name": n, "shape": list(w.shape)} for n, w in mats],
        "weight_bytes": sum(w.numel() * w.element_size() for _, w in mats),
        "bytes_per_iter": sum(layer_bytes),
        "floor_per_iter_s": sum(layer_bytes) / (bw * 1e9),
        "rows": rows,
    }


# --------------------------------------------------------------------------- part (b)


@dataclass
class ConvLayer:
    name: str
    weight: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_shape: tuple[int, ...]  # (1, C, H, W)
    out_shape: tuple[int, ...] = ()


def conv_layers(model: nn.Module, device: str, size: int) -> list[ConvLayer]:
    """Every Conv2d with the input shape it sees for one zero image of ``size`` x ``size``."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        return []  # e.g. an MLP, whose forward would not accept an image anyway
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes[name] = (tuple(inp[0].shape), tuple(out.shape))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in convs.items()]
    try:
        model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for n, m in convs.items():
        if n not in shapes:
            continue  # not on the forward path
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"{n}: only integer zero padding is supported, got {m.padding!r}/{m.padding_mode}")
        layers.append(ConvLayer(n, m.weight.detach().to(device=device, dtype=torch.float32), tuple(m.stride),
                                tuple(m.padding), tuple(m.dilation), m.groups, shapes[n][0], shapes[n][1]))
    return layers


def pick_evenly(items: list[ConvLayer], n: int | None) -> list[ConvLayer]:
    # The first N layers of a ResNet all run at the highest resolution; spreading the sample
    # over the depth covers every stage (resolution, width, kernel size, stride).
    if n is None or n >= len(items):
        return items
    if n <= 1:
        return items[:max(n, 0)]
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def conv_gram(layer: ConvLayer) -> Gram:
    """A and Aᵀ of the bias-free conv: F.conv2d and F.conv_transpose2d with output_padding.

    The transpose conv gives back the input size only up to the rows/columns the strided conv
    never reached; output_padding restores them (as zeros in the adjoint, which is correct).
    """
    w = layer.weight
    h, wd = layer.in_shape[2], layer.in_shape[3]
    ho, wo = layer.out_shape[2], layer.out_shape[3]
    k = w.shape[2:]
    opad = tuple(
        size - ((o - 1) * s - 2 * p + d * (kk - 1) + 1)
        for size, o, s, p, d, kk in zip((h, wd), (ho, wo), layer.stride, layer.padding, layer.dilation, k)
    )

    def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        z = F.conv_transpose2d(y, w, None, layer.stride, layer.padding, opad, layer.groups, layer.dilation)
        return y, z

    return gram


def check_adjoint(layer: ConvLayer, gram: Gram, device: str) -> None:
    """<A x, A x> must equal <x, Aᵀ A x>: catches a wrong output_padding or stride mapping."""
    x = start_vector(layer.in_shape, device)
    y, z = gram(x)
    lhs, rhs = float((y * y).sum()), float((x * z).sum())
    if abs(lhs - rhs) > 1e-4 * max(abs(lhs), 1e-30):
        raise AssertionError(f"{layer.name}: adjoint mismatch {lhs} vs {rhs}")


def part_b(model_name: str, model: nn.Module, device: str, tols: Sequence[float], bw: float,
           max_layers: int | None, size: int) -> dict[str, Any] | None:
    all_layers = conv_layers(model, device, size)
    if not all_layers:
        return None
    layers = pick_evenly(all_layers, max_layers)
    if not layers:
        return None  # --conv-layers 0
    methods = engine_methods(device)

    def nbytes(shape: Sequence[int]) -> int:
        return math.prod(shape) * 4

    # Forward reads x and W and writes y; the adjoint reads y and W and writes z (input-sized).
    layer_bytes = [2 * (nbytes(c.weight.shape) + nbytes(c.in_shape) + nbytes(c.out_shape)) for c in layers]

    reference: dict[str, float] = {}  # per layer: the best lower bound known before timing

    def run_plain(c: ConvLayer, gram: Gram, tol: float, oracle: bool = False) -> Estimate:
        target = reference[c.name] if oracle else None
        return plain_power(gram, start_vector(c.in_shape, device), tol,
                           max_iters=ORACLE_MAX_ITERS if oracle else MAX_ITERS, target=target)

    def run_engine(c: ConvLayer, tol: float, method: str | None, settings: spectral.Settings | None = None,
                   ) -> Estimate:
        settings = settings or engine_settings(tol, device, method)[0]
        pads = [(c.padding[0], c.padding[0]), (c.padding[1], c.padding[1])]
        if hasattr(spectral, "conv_estimate"):
            est = spectral.conv_estimate(c.weight, c.in_shape, stride=c.stride, dilation=c.dilation,
                                         groups=c.groups, pads=pads, settings=settings)
        else:  # lipcheck before conv_estimate
            fn = spectral.conv_forward(c.weight, stride=c.stride, dilation=c.dilation, groups=c.groups, pads=pads)
            est = spectral.operator_estimate(fn, c.in_shape, settings)
        return Estimate(est.sigma, est.iterations, est.converged)

    jobs: list[tuple[Row, Callable[[ConvLayer, Gram], Estimate]]] = []
    for tol in tols:
        jobs.append((Row("b", model_name, "plain power", tol), lambda c, g, t=tol: run_plain(c, g, t)))
        jobs.append((Row("b", model_name, ORACLE, tol), lambda c, g, t=tol: run_plain(c, g, t, True)))
        for m in methods:
            label = engine_settings(tol, device, m)[1]
            jobs.append((Row("b", model_name, label, tol), lambda c, g, t=tol, mm=m: run_engine(c, t, mm)))

    grams = [conv_gram(c) for c in layers]
    for c, g in zip(layers, grams):
        check_adjoint(c, g, device)
    # The oracle-stopped power row needs each layer's norm before it runs: the engine in float64 at
    # a tight tolerance gives a lower bound within about that of it (not timed). Plain power
    # stopped within tol of that value has reached at least that accuracy.
    log(f"  (b) {model_name}: reference norms of {len(layers)} layers, float64 (untimed) ...")
    ref_settings = spectral.Settings(tol=REFERENCE_TOL, max_iters=MAX_ITERS, seed=SEED, device=device,
                                     dtype=torch.float64)
    for c in layers:
        reference[c.name] = run_engine(c, REFERENCE_TOL, None, ref_settings).sigma
    # Warm-up: a few steps of each method on the cheapest layer (oneDNN/cuDNN pick kernels on
    # first use per shape; that choice is not part of the steady-state cost).
    cheap = min(range(len(layers)), key=lambda i: layer_bytes[i])
    for _, fn in jobs:
        fn(layers[cheap], grams[cheap])

    total_start = time.perf_counter()
    for i, (c, g) in enumerate(zip(layers, grams)):
        t_layer = time.perf_counter()
        for row, fn in jobs:
            est, t = timed(device, fn, c, g)
            row.time_s += t
            row.iterations += est.iterations
            row.not_converged += 0 if est.converged else 1
            row.sigmas.append(est.sigma)
            row.layer_iters.append(est.iterations)
        log(f"  (b) {model_name}: {i + 1}/{len(layers)} {c.name} in={c.in_shape[1:]} w={tuple(c.weight.shape)} "
            f"{time.perf_counter() - t_layer:.1f}s (total {time.perf_counter() - total_start:.0f}s)")

    rows = [r for r, _ in jobs]
    # Every method returns a lower bound on the operator norm (||A x|| for a unit x), so the
    # largest value any of them found is the best available reference; plain power at the
    # tightest tolerance is among them but can stop early when the top singular values cluster.
    ref = [max(reference[c.name], *vals) for c, vals in zip(layers, zip(*(r.sigmas for r in rows)))]
    tightest = min(tols)
    plain_tight = next(r for r in rows if r.method == "plain power" and r.tol == tightest)
    for r in rows:
        r.max_rel_err = rel_err(r.sigmas, ref)
        r.floor_s = sum(it * b for it, b in zip(r.layer_iters, layer_bytes)) / (bw * 1e9)
    fill_ratios(rows, None)
    return {
        "part": "b",
        "model": model_name,
        "input_size": size,
        "conv_layers_total": len(all_layers),
        "layers": [{"name": c.name, "in_shape": list(c.in_shape), "out_shape": list(c.out_shape),
                    "weight_shape": list(c.weight.shape), "stride": list(c.stride), "padding": list(c.padding),
                    "reference_sigma": s}
                   for c, s in zip(layers, ref)],
        "bytes_per_iter": sum(layer_bytes),
        "floor_per_iter_s": sum(layer_bytes) / (bw * 1e9),
        "plain_tightest_rel_err_vs_reference": rel_err(plain_tight.sigmas, ref),
        "rows": rows,
    }


# --------------------------------------------------------------------------- part (c)


def part_c(model_name: str, model: nn.Module, device: str, size: int) -> dict[str, Any]:
    """The whole ``lipcheck.analyze`` of the model saved as ONNX, as ``lipcheck inspect`` runs it:
    loading, graph, every layer's estimate and certificate, the composed bound (default settings)."""
    import tempfile

    import lipcheck

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{model_name}.onnx")
        torch.onnx.export(model.cpu().eval(), (torch.zeros(1, 3, size, size),), path, dynamo=False,
                          opset_version=17)
        lipcheck.analyze(path, device=device, tol=1e-2, max_iters=2)  # warm-up: imports, first-call costs
        t0 = time.perf_counter()
        report = lipcheck.analyze(path, device=device)
        sync(device)
        wall = time.perf_counter() - t0
    net = report.network
    return {"part": "c", "model": model_name, "input_size": size, "wall_s": wall,
            "layers": len(report.layers), "lipschitz_bound": net.lipschitz_bound,
            "lipschitz_estimate": net.lipschitz_estimate, "settings": report.settings}


def print_section_c(sec: dict[str, Any]) -> None:
    print(f"(c) lipcheck.analyze of {sec['model']} as ONNX at {sec['input_size']}x{sec['input_size']} "
          f"(default settings {sec['settings']}):")
    print(f"  {sec['wall_s']:.2f} s for {sec['layers']} layer rows; certified bound {sec['lipschitz_bound']:.6g}, "
          f"estimate {fmt(sec['lipschitz_estimate'], '.6g')}")
    print()


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_section(sec: dict[str, Any]) -> None:
    rows: list[Row] = sec["rows"]
    if sec["part"] == "a":
        head = (f"(a) {sec['model']}: {len(sec['layers'])} reshaped weights, {sec['weight_bytes'] / 1e6:.1f} MB; "
                f"one gram step over all layers reads {sec['bytes_per_iter'] / 1e6:.1f} MB "
                f"-> floor {sec['floor_per_iter_s'] * 1e3:.2f} ms/iter")
        err_head = "max rel err vs exact"
    else:
        head = (f"(b) {sec['model']}: {len(sec['layers'])} of {sec['conv_layers_total']} Conv2d at "
                f"{sec['input_size']}x{sec['input_size']}; one forward+adjoint over them moves "
                f"{sec['bytes_per_iter'] / 1e6:.1f} MB -> floor {sec['floor_per_iter_s'] * 1e3:.2f} ms/iter")
        err_head = "max rel diff vs best"
    print(head)
    cols = f"  {'method':<26}{'tol':>7}{'time s':>10}{'iters':>8}{'!conv':>6}{err_head:>22}" \
           f"{'x exact':>9}{'x plain':>9}{'x oracle':>9}{'floor s':>10}{'t/floor':>9}"
    print(cols)
    for r in rows:
        ratio = r.time_s / r.floor_s if r.floor_s else None
        print(f"  {r.method:<26}{fmt(r.tol, '.0e'):>7}{r.time_s:>10.3f}{r.iterations:>8}{r.not_converged:>6}"
              f"{fmt(r.max_rel_err, '.2e'):>22}{fmt(r.x_exact, '.2f'):>9}{fmt(r.x_plain, '.2f'):>9}"
              f"{fmt(r.x_oracle, '.2f'):>9}{fmt(r.floor_s, '.3f'):>10}{fmt(ratio, '.1f'):>9}")
    if sec["part"] == "b":
        print(f"  (reference per layer = largest estimate of any row; plain power at the tightest tol is "
              f"{sec['plain_tightest_rel_err_vs_reference']:.2e} below it at worst)")
    print()


def to_json(obj: Any) -> Any:
    if isinstance(obj, Row):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resnet18, a small MLP, 4 conv layers, tol 1e-4 in (b)")
    ap.add_argument("--json", metavar="OUT.json", help="also write every number (and per-layer values) here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--conv-layers", type=int, default=None, metavar="N",
                    help="measure N Conv2d layers in (b), spread over the depth (default: all; --quick: 4)")
    ap.add_argument("--size", type=int, default=224, help="input image size for (b) (default 224)")
    ap.add_argument("--no-inspect", action="store_true",
                    help="skip part (c), the whole lipcheck.analyze of the ResNet (its ONNX export included)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice); on a CPU shared with other "
                         "processes one thread can beat two, so the count is part of what is measured")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = spectral.resolve_device(args.device)
    # No autograd unless asked for: the engine's operator_estimate enables it locally for its vjp.
    torch.set_grad_enabled(False)
    tols_a = [1e-4, 1e-6]
    tols_b = [1e-4] if args.quick else [1e-4, 1e-6]
    conv_cap = args.conv_layers if args.conv_layers is not None else (4 if args.quick else None)

    facts = machine_facts(device)
    log("measuring memory bandwidth ...")
    bwd = measure_bandwidth(device)
    bw = bwd["read_gbs"]
    print(f"lipcheck spectral benchmark  ({'quick' if args.quick else 'full'} mode)")
    print(f"  torch {facts['torch']}, torchvision {facts['torchvision']}, python {facts['python']}")
    print(f"  device {device}: {facts['device_name']}; cpu_count {facts['cpu_count']} "
          f"(usable {facts['cpus_usable']}), torch threads {facts['torch_threads']}, "
          f"loadavg {facts['loadavg_at_start']}")
    print(f"  bandwidth ({bwd['probe_mb']:.0f} MB float32, best of {PROBE_REPEATS}): read {bwd['read_gbs']:.1f} GB/s, "
          f"copy {bwd['copy_gbs']:.1f} GB/s; floors use the read figure")
    print(f"  engine methods: {', '.join(engine_settings(1e-4, device, m)[1] for m in engine_methods(device))}; "
          f"max_iters {MAX_ITERS}, float32, seed {SEED}")
    print()

    sections: list[dict[str, Any]] = []
    t_run = time.perf_counter()
    for name, model in build_models(args.quick):
        log(f"model {name}: part (a)")
        sec = part_a(name, model.to(device), device, tols_a, bw)
        print_section(sec)
        sections.append(sec)
        log(f"model {name}: part (b)")
        sec_b = part_b(name, model.cpu(), device, tols_b, bw, conv_cap, args.size)
        if sec_b is None:
            print(f"(b) {name}: no Conv2d layers measured\n")
        else:
            print_section(sec_b)
            sections.append(sec_b)
        if not args.no_inspect and name.startswith("resnet"):
            log(f"model {name}: part (c), lipcheck.analyze")
            sec_c = part_c(name, model, device, args.size)
            print_section_c(sec_c)
            sections.append(sec_c)
        sys.stdout.flush()
    total = time.perf_counter() - t_run
    facts["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"total wall time {total:.0f} s; loadavg at end {facts['loadavg_at_end']}")

    if args.json:
        out = {"mode": "quick" if args.quick else "full", "machine": facts, "bandwidth": bwd,
               "max_iters": MAX_ITERS, "conv_layers_cap": conv_cap, "wall_s": total, "sections": sections}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(out), fh, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
