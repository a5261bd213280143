"""What the benchmark scripts share: timing (CUDA synchronised), machine facts, a memory
bandwidth probe, the seeded models, one layer-major job loop, tables and JSON.

Numbers are only comparable within one process: every ratio a script prints is taken between
rows of the same run, under the same machine load. benchmarks/README.md explains the columns.
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
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from lipcheck import spectral

MAX_ITERS = 5000
SEED = 0
ORACLE = "plain power, oracle stop"
# The bandwidth probe must be far larger than any cache so it measures DRAM (or HBM), not L3.
PROBE_BYTES = 256 * 2**20
PROBE_REPEATS = 5
T = TypeVar("T")


class Result(Protocol):
    """What a measured call returns: ``spectral.Estimate`` or ``testing.PowerEstimate``."""

    @property
    def sigma(self) -> float: ...
    @property
    def iterations(self) -> int: ...
    @property
    def converged(self) -> bool: ...


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def timed(device: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    # CUDA kernels are asynchronous: without a sync the clock would stop before the work ends.
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def settings(tol: float, device: str, method: str = "lanczos", dtype: torch.dtype = torch.float32) -> spectral.Settings:
    return spectral.Settings(tol=tol, max_iters=MAX_ITERS, seed=SEED, device=device, dtype=dtype, method=method)


def start_vector(shape: Sequence[int], device: str) -> torch.Tensor:
    """lipcheck's own seeded start, so the reference loop and the engine start alike and a
    difference in iterations comes from the loops, not from the luck of the start."""
    return spectral.start_vector(tuple(shape), settings(1e-6, device))


# --------------------------------------------------------------------------- rows and the job loop


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
    max_rel_err: float | None = None  # vs exact (a) or vs the best estimate of any row (b)
    x_exact: float | None = None  # t_exact / t: > 1 means faster than exact
    x_plain: float | None = None  # t_plain(same tol) / t: > 1 means faster than plain power
    x_oracle: float | None = None  # t(plain power stopped at the same accuracy) / t
    floor_s: float | None = None  # bandwidth floor for the iterations this method used
    sigmas: list[float] = field(default_factory=list)
    layer_iters: list[int] = field(default_factory=list)


Job = tuple[Row, Callable[[Any], Result]]
Gram = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (A x, AᵀA x)


def run_jobs(items: Sequence[Any], jobs: Sequence[Job], device: str, cheapest: int,
             label: Callable[[int, Any], str]) -> None:
    """Every job on every item, layer-major, after one warm-up of each on ``items[cheapest]``.

    Layer-major order (every method on layer 1, then layer 2, ...) spreads a shared machine's
    load bursts over all methods instead of penalising whichever ran during one. The warm-up
    keeps first-call costs (thread pools, LAPACK init, oneDNN/cuDNN kernel choice per shape)
    out of the steady-state cost being compared.
    """
    for _, fn in jobs:
        fn(items[cheapest])
    start = time.perf_counter()
    for i, item in enumerate(items):
        for row, fn in jobs:
            est, t = timed(device, fn, item)
            row.time_s += t
            row.iterations += est.iterations
            row.not_converged += 0 if est.converged else 1
            row.sigmas.append(est.sigma)
            row.layer_iters.append(est.iterations)
        log(f"  {i + 1}/{len(items)} {label(i, item)} (total {time.perf_counter() - start:.0f}s)")


def spread(items: Sequence[T], n: int | None) -> list[T]:
    """``n`` of ``items`` evenly spaced, first and last included (all of them when ``n`` is None)."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 1:
        return list(items[: max(n, 0)])
    return [items[i] for i in sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})]


def finish(rows: Sequence[Row], reference: Sequence[float], layer_bytes: Sequence[int], gbs: float,
           exact: Row | None = None) -> None:
    """Errors against ``reference`` per layer, bandwidth floors, and the ratio columns."""
    plain = {r.tol: r for r in rows if r.method == "plain power"}
    oracle = {r.tol: r for r in rows if r.method == ORACLE}
    for r in rows:
        if r is exact:
            continue
        r.max_rel_err = max((abs(v - t) / t if t > 0 else abs(v)) for v, t in zip(r.sigmas, reference))
        r.floor_s = sum(it * b for it, b in zip(r.layer_iters, layer_bytes)) / (gbs * 1e9)
        if r.time_s <= 0:
            continue
        if exact is not None:
            r.x_exact = exact.time_s / r.time_s
        if r.tol in plain:
            r.x_plain = plain[r.tol].time_s / r.time_s
        if r.tol in oracle:
            r.x_oracle = oracle[r.tol].time_s / r.time_s


# --------------------------------------------------------------------------- machine and models


def machine_facts(device: str) -> dict[str, Any]:
    try:
        import torchvision

        vision = torchvision.__version__
    except ImportError:
        vision = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": vision,
        "device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def measure_bandwidth(device: str) -> dict[str, float]:
    """Best-of-N GB/s for a large copy (read+write) and a large sum (read only).

    The sum's figure is used for the floors: a matvec streams the weight once and writes a vector
    that is tiny next to it, so it is read-bound like a reduction.
    """
    src = torch.rand(PROBE_BYTES // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults would otherwise land in the first timed repeat
    float(src.sum())
    best_copy = min(timed(device, dst.copy_, src)[1] for _ in range(PROBE_REPEATS))
    best_sum = min(timed(device, lambda: float(src.sum()))[1] for _ in range(PROBE_REPEATS))
    return {"probe_mb": PROBE_BYTES / 2**20, "copy_gbs": 2 * PROBE_BYTES / best_copy / 1e9,
            "read_gbs": PROBE_BYTES / best_sum / 1e9}


def resnet(quick: bool) -> tuple[str, nn.Module]:
    """torchvision's ResNet-18 (quick) or ResNet-50, seeded, nothing downloaded."""
    import torchvision  # the `bench` extra

    torch.manual_seed(SEED)
    name = "resnet18" if quick else "resnet50"
    return name, getattr(torchvision.models, name)(weights=None).eval()


def mlp(quick: bool) -> tuple[str, nn.Module]:
    widths = [784, 1024, 1024, 1000] if quick else [784, 4096, 4096, 4096, 1000]
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return "mlp-" + "-".join(map(str, widths)), nn.Sequential(*layers).eval()


# --------------------------------------------------------------------------- command line and output


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer layers (see the README)")
    ap.add_argument("--json", metavar="OUT.json", help="also write every number (and per-layer values) here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice); on a CPU shared with other "
                         "processes one thread can beat two, so the count is part of what is measured")
    return ap


def start(args: argparse.Namespace, title: str, engine: bool = True) -> tuple[str, dict[str, Any], dict[str, float]]:
    """Threads, device, no autograd (the engine enables it locally for its vjp); prints the
    header (with the engine's settings when ``engine``) and returns (device, machine facts, bandwidth)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = spectral.resolve_device(args.device)
    torch.set_grad_enabled(False)
    facts = machine_facts(device)
    log("measuring memory bandwidth ...")
    bw = measure_bandwidth(device)
    print(f"{title}  ({'quick' if args.quick else 'full'} mode)")
    print(f"  torch {facts['torch']}, torchvision {facts['torchvision']}, python {facts['python']}")
    print(f"  device {device}: {facts['device_name']}; cpu_count {facts['cpu_count']} (usable {facts['cpus_usable']}), "
          f"torch threads {facts['torch_threads']}, loadavg {facts['loadavg_at_start']}")
    print(f"  bandwidth ({bw['probe_mb']:.0f} MB float32, best of {PROBE_REPEATS}): read {bw['read_gbs']:.1f} GB/s, "
          f"copy {bw['copy_gbs']:.1f} GB/s; floors use the read figure")
    print(f"  estimates: max_iters {MAX_ITERS}, float32, seed {SEED}\n" if engine else "")
    return device, facts, bw


def _cell(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_rows(head: str, rows: Sequence[Row], err_head: str) -> None:
    print(head)
    print(f"  {'method':<26}{'tol':>7}{'time s':>10}{'iters':>8}{'!conv':>6}{err_head:>22}"
          f"{'x exact':>9}{'x plain':>9}{'x oracle':>9}{'floor s':>10}{'t/floor':>9}")
    for r in rows:
        ratio = r.time_s / r.floor_s if r.floor_s else None
        print(f"  {r.method:<26}{_cell(r.tol, '.0e'):>7}{r.time_s:>10.3f}{r.iterations:>8}{r.not_converged:>6}"
              f"{_cell(r.max_rel_err, '.2e'):>22}{_cell(r.x_exact, '.2f'):>9}{_cell(r.x_plain, '.2f'):>9}"
              f"{_cell(r.x_oracle, '.2f'):>9}{_cell(r.floor_s, '.3f'):>10}{_cell(ratio, '.1f'):>9}")


def write_json(path: str | None, args: argparse.Namespace, facts: dict[str, Any], bw: dict[str, float],
               sections: list[dict[str, Any]], wall_s: float) -> None:
    """The whole run: mode, machine facts (load average at start and end), bandwidth, sections."""
    facts["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"total wall time {wall_s:.0f} s; loadavg at end {facts['loadavg_at_end']}")
    if not path:
        return
    doc = {"mode": "quick" if args.quick else "full", "machine": facts, "bandwidth": bw, "max_iters": MAX_ITERS,
           "wall_s": wall_s, "sections": sections}

    def plain(obj: Any) -> Any:
        if isinstance(obj, Row):
            return asdict(obj)
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return [plain(v) for v in obj] if isinstance(obj, list) else obj

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(plain(doc), fh, indent=1)
    log(f"wrote {path}")


def nbytes(shape: Sequence[int], itemsize: int = 4) -> int:
    return math.prod(shape) * itemsize
