"""An empirical lower bound on a network's Lipschitz constant (``--empirical``).

The certified bound is an upper bound; this finds inputs where the network really stretches
a direction by a lot, so the report shows the bracket [lower, upper] that holds the true
constant. From several seeded start points x it runs, in float64:

- power iteration on J(x)^T J(x) (J v by forward-over-reverse autograd, J^T u by a backward
  pass) for the top right singular vector v of the Jacobian at x;
- an ascent step on s(x) = |J(x) v| (its gradient by double backward), or, where that
  gradient vanishes (piecewise-linear networks such as ReLU ones, whose Jacobian is constant
  on each linear region), a seeded random step; a step is kept only if s grows (hill
  climbing), and x is projected back onto a ball of radius ``RADIUS_PER_DIM`` sqrt(n).

The number reported is not the autograd value but a secant quotient
|f(x + h v) - f(x)| / |h v| in float64, taken on both sides of x and lowered by an
allowance for rounding: for any function and any two inputs, that quotient is at most the
Lipschitz constant, so it is a true lower bound whether or not f is differentiable at x
(the autograd "Jacobian" of ReLU at a kink is a convention, the secant is not).

Running the model needs the model as torch code: the in-memory module when one was given,
else the ONNX graph converted with onnx2torch. When neither works, the report says why and
the analysis goes on.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

STARTS = 4  # seeded start points the ascent runs from
SCREEN_PER_START = 32  # seeded points screened per start
TRIALS = 3  # random directions tried per step where the gradient vanishes
ASCENT_STEPS = 30  # hill-climbing steps per start
POWER_STEPS = 25  # power iterations per point (warm-started from the previous v)
RADIUS_PER_DIM = 3.0  # start points ~ N(0, 1); ascent stays within 3 sqrt(n) of 0
TIME_LIMIT_S = 20.0  # the search stops after this; what it found stands
ROUNDING = 1e-10  # allowance for float64 rounding of f, relative to |f(x)| + |f(x + h v)|

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Lower:
    """``value``: a true lower bound on the network's Lipschitz constant (None: none
    found); ``note``: how it was found (seed, starts, point), or why not; ``seconds``."""

    value: float | None
    note: str
    seconds: float


def _flat_output(module: torch.nn.Module) -> Fn:
    def f(x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        if isinstance(out, (tuple, list)):
            return torch.cat([o.reshape(-1) for o in out if isinstance(o, torch.Tensor)])
        return out.reshape(-1)

    return f


def _jvp(f: Fn, x: torch.Tensor, v: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    return torch.autograd.functional.jvp(f, x, v, create_graph=create_graph)[1]


def _vjp(f: Fn, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.vjp(f, x, u)[1]


def _top_direction(f: Fn, x: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """(|J v|, v) after ``steps`` power iterations on J^T J from v (unit)."""
    for _ in range(steps):
        w = _vjp(f, x, _jvp(f, x, v))
        n = float(w.norm())
        if not math.isfinite(n) or n == 0.0:
            break
        v = w / n
    return float(_jvp(f, x, v).norm()), v


@dataclass
class Region:
    """Where the search looks: ``project`` maps a point into the region, ``sample`` draws a
    start point in it. The default is the ball of radius ``RADIUS_PER_DIM`` sqrt(n); with a
    declared input domain (lipcheck.interval.Domain), that domain, so the lower bound is one
    for the constant on the domain too."""

    project: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Generator, int], torch.Tensor]
    text: str


def _default_region(shape: tuple[int, ...]) -> Region:
    radius = RADIUS_PER_DIM * math.sqrt(math.prod(shape))

    def project(x: torch.Tensor) -> torch.Tensor:
        n = float(x.norm())
        return x * (radius / n) if n > radius else x

    def sample(gen: torch.Generator, k: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64) * (1.0 + 2.0 * (k % 2))

    return Region(project, sample, "")


def domain_region(domain: Any, shape: tuple[int, ...]) -> Region:
    """The region of a ``lipcheck.interval.Domain``: its box, and its ball when it has one
    (projected onto the ball, then clamped to the box: the ball's centre is in the box, so
    clamping keeps the point in the ball)."""
    lo_np, hi_np = domain.box(shape)
    lo, hi = torch.from_numpy(lo_np), torch.from_numpy(hi_np)
    centre = torch.from_numpy(domain.centre(shape))
    radius = domain.radius

    def project(x: torch.Tensor) -> torch.Tensor:
        if radius is not None:
            d = float((x - centre).norm())
            if d > radius:
                x = centre + (x - centre) * (radius / d)
        return torch.maximum(torch.minimum(x, hi), lo)

    def sample(gen: torch.Generator, k: int) -> torch.Tensor:
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        if k % 2:  # corners as well as insides: products and ReLU patterns peak there
            u = torch.round(u)
        span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.zeros_like(lo))
        base = torch.where(torch.isfinite(lo), lo, centre)
        x = base + u * span if radius is None else \
            centre + torch.randn(shape, generator=gen, dtype=torch.float64) * (radius / math.sqrt(u.numel()))
        return project(x)

    return Region(project, sample, f"; inside the declared domain ({domain.describe()})")


def _secant(f: Fn, x: torch.Tensor, v: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """max over both sides of |f(y) - f(x)| / |y - x|, y = x + t v brought into the region,
    minus the rounding allowance: a lower bound on the Lipschitz constant of f (on the region)
    for any f."""
    with torch.no_grad():
        fx = f(x)
        best = 0.0
        scale = max(1.0, float(x.norm()))
        for t in (1e-4 * scale, -1e-4 * scale, 1e-6 * scale):
            point = project(x + t * v)
            y = f(point)
            step = float((point - x).norm())
            diff = float((y - fx).norm()) - ROUNDING * (float(fx.norm()) + float(y.norm()))
            if math.isfinite(diff) and step > 0:
                best = max(best, diff / step)
    return best


def search(f: Fn, shape: tuple[int, ...], *, seed: int = 0, starts: int = STARTS,
           steps: int = ASCENT_STEPS, power_steps: int = POWER_STEPS,
           time_limit: float = TIME_LIMIT_S, region: Region | None = None) -> tuple[float, int, torch.Tensor]:
    """The largest secant lower bound found from ``starts`` seeded points: (value, the start
    it came from, the point). ``f`` takes a float64 tensor of ``shape``, returns a flat one."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    region = region or _default_region(shape)
    best, best_start, best_x = 0.0, -1, torch.zeros(shape, dtype=torch.float64)
    # Screening: many seeded points with a few power steps each; the ascent starts from the
    # best ``starts`` of them (the Jacobian norm varies a lot between linear regions).
    screened = []
    for k in range(SCREEN_PER_START * starts):
        x = region.sample(gen, k)
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        s, v = _top_direction(f, x, v / v.norm(), 8)
        screened.append((s, k, x, v))
        if time.perf_counter() - t0 > time_limit / 4:
            break
    screened.sort(key=lambda item: -item[0])
    for s, start, x, v in screened[:starts]:
        s, v = _top_direction(f, x, v, power_steps)
        lr = 0.1 * math.sqrt(n)
        for _ in range(steps):
            if time.perf_counter() - t0 > time_limit:
                break
            xg = x.detach().requires_grad_(True)
            value = _jvp(f, xg, v, create_graph=True).norm()
            grad = torch.autograd.grad(value, xg, allow_unused=True)[0] if value.requires_grad else None
            smooth = grad is not None and bool(torch.isfinite(grad).all()) and float(grad.norm()) > 1e-12
            # the gradient where there is one, else a few seeded random directions
            directions = [grad] if smooth else \
                [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(TRIALS)]
            improved = False
            for direction in directions:
                assert direction is not None
                trial = region.project(x + lr * direction / direction.norm())
                s_new, v_new = _top_direction(f, trial, v, power_steps // 5 + 1)
                if s_new > s:
                    x, s, v, improved = trial.detach(), s_new, v_new, True
            lr = lr * 1.3 if improved else max(lr * 0.7, 1e-3)
        _, v = _top_direction(f, x, v, power_steps)
        value = _secant(f, x, v, region.project)
        if value > best:
            best, best_start, best_x = value, start, x
        if time.perf_counter() - t0 > time_limit:
            break
    return best, best_start, best_x


def _as_float64(module: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(module)
    m.eval()
    return m.to(torch.float64)


def _runnable(source: Any) -> tuple[torch.nn.Module | None, str]:
    """The model as a float64 torch module, or None and why not."""
    if isinstance(source, torch.nn.Module):
        return _as_float64(source), "the in-memory torch module"
    try:
        from onnx2torch import convert
    except ImportError:
        return None, "onnx2torch is not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(source)
    except Exception as exc:  # noqa: BLE001 - any converter failure: no lower bound, said why
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"onnx2torch cannot convert the graph ({text[:160]})"
    return _as_float64(module), "the ONNX graph run through onnx2torch"


def empirical_lower(source: Any, input_shape: tuple[int, ...] | None, *, seed: int = 0,
                    starts: int = STARTS, steps: int = ASCENT_STEPS,
                    time_limit: float = TIME_LIMIT_S, domain: Any = None) -> Lower:
    """A lower bound for ``source`` (an ``nn.Module`` or an ``onnx.ModelProto`` with one data
    input) on inputs of ``input_shape`` (in ``domain``, a lipcheck.interval.Domain, when given)."""
    t0 = time.perf_counter()
    if input_shape is None:
        return Lower(None, "no lower bound: the input shape is unknown (pass --input-shape)", 0.0)
    if not isinstance(source, torch.nn.Module):
        inputs = _data_inputs(source)
        if len(inputs) != 1:
            return Lower(None, f"no lower bound: the graph has {len(inputs)} data inputs (one is supported)", 0.0)
    module, how = _runnable(source)
    if module is None:
        return Lower(None, f"no lower bound: the model cannot be run ({how})", time.perf_counter() - t0)
    f = _flat_output(module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            region = domain_region(domain, tuple(input_shape)) if domain is not None else None
            value, start, _ = search(f, tuple(input_shape), seed=seed, starts=starts, steps=steps,
                                     time_limit=time_limit, region=region)
    except Exception as exc:  # noqa: BLE001 - a model that fails to run: no lower bound, said why
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Lower(None, f"no lower bound: running {how} failed ({text[:160]})", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if not value > 0.0:
        return Lower(None, f"no lower bound: no point with a nonzero secant found ({how})", seconds)
    return Lower(value, f"lower bound {value:.6g}: a secant quotient |f(x + h v) - f(x)| / |h v| in float64 "
                        f"at a point found by Jacobian-norm ascent from seeded point {start} (the best "
                        f"{starts} of {SCREEN_PER_START * starts} screened; seed {seed}; {how}"
                        f"{region.text if region is not None else ''}; "
                        f"{seconds:.2g} s)", seconds)


def _data_inputs(model: Any) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def attach(analysis: Any, source: Any, seed: int, domain: Any = None) -> None:
    """Fill ``network.lipschitz_lower`` of an analysis' report (``source``: what was analysed,
    an ``nn.Module`` or a path), with a note saying how it was found and the ratio
    upper / lower; a model that cannot be run gets a note saying why, never an error."""
    report = analysis.report
    if analysis.graph is None or analysis.loaded.onnx_model is None:
        report.notes.append("no lower bound: the model has no graph to run")
        return
    model = source if isinstance(source, torch.nn.Module) else analysis.loaded.onnx_model
    shape = tuple(report.model.input_shape) if report.model.input_shape else None
    found = empirical_lower(model, shape, seed=seed, domain=domain)
    note = found.note
    upper = report.network.lipschitz_bound
    if found.value is not None:
        report.network.lipschitz_lower = found.value
        if upper is not None and math.isfinite(upper) and upper > 0:
            note += f"; certified upper / lower = {upper / found.value:.4g}"
            if found.value > upper * (1 + 1e-9):
                note += " (below 1: the certified bound is wrong here, please report it)"
    report.notes.append(note)
