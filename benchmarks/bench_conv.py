"""True convolution operator norms: lipcheck's estimates against plain power iteration.

Each Conv2d of a seeded ResNet, bias-free, on the input size it sees for one image. Plain power
(``lipcheck.testing.plain_power``) runs ``F.conv2d`` and ``F.conv_transpose2d``, adjoint-checked
first; the engine rows call ``spectral.conv_estimate``, as ``inspect`` does. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import _harness as h
import torch
import torch.nn.functional as F
from torch import nn

from lipcheck import spectral
from lipcheck.testing import PowerEstimate, plain_power

ORACLE_MAX_ITERS = 3000  # plain power to a given accuracy on conv operators can need more: capped, flagged
REFERENCE_TOL = 1e-9


@dataclass
class Conv:
    name: str
    weight: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_shape: tuple[int, ...]  # (1, C, H, W)
    out_shape: tuple[int, ...]

    def gram(self) -> h.Gram:
        """A and Aᵀ: the transpose conv gives back the input size only up to the rows/columns
        the strided conv never reached; output_padding restores them (zeros in the adjoint)."""
        k = self.weight.shape[2:]
        opad = tuple(size - ((o - 1) * s - 2 * p + d * (kk - 1) + 1) for size, o, s, p, d, kk in
                     zip(self.in_shape[2:], self.out_shape[2:], self.stride, self.padding, self.dilation, k))

        def apply(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
            return y, F.conv_transpose2d(y, self.weight, None, self.stride, self.padding, opad, self.groups,
                                         self.dilation)

        return apply


def conv_layers(model: nn.Module, device: str, size: int) -> list[Conv]:
    """Every Conv2d on the forward path, with its input and output shapes for one image."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, (tuple(i[0].shape), tuple(o.shape))))
             for n, m in convs.items()]
    try:
        model(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    for n, m in convs.items():
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"{n}: only integer zero padding is measured, got {m.padding!r}/{m.padding_mode}")
    return [Conv(n, m.weight.detach().to(device=device, dtype=torch.float32), tuple(m.stride),
                 tuple(int(p) for p in m.padding), tuple(m.dilation), m.groups, *shapes[n])
            for n, m in convs.items() if n in shapes]


def measure(model_name: str, model: nn.Module, device: str, tols: Sequence[float], gbs: float,
            cap: int | None, size: int) -> dict[str, Any]:
    every = conv_layers(model, device, size)
    # The first N convs of a ResNet all run at the highest resolution; N spread over the depth
    # cover every stage (resolution, width, kernel size, stride).
    layers = h.spread(every, cap)
    if not layers:
        raise SystemExit(f"{model_name}: no Conv2d layer to measure")
    # Forward reads x and W and writes y; the adjoint reads y and W and writes z (input-sized).
    layer_bytes = [2 * (h.nbytes(c.weight.shape) + h.nbytes(c.in_shape) + h.nbytes(c.out_shape)) for c in layers]
    for c in layers:
        x = h.start_vector(c.in_shape, device)
        y, z = c.gram()(x)
        lhs, rhs = float((y * y).sum()), float((x * z).sum())
        if abs(lhs - rhs) > 1e-4 * max(abs(lhs), 1e-30):
            raise AssertionError(f"{c.name}: adjoint mismatch {lhs} vs {rhs}")

    def engine(c: Conv, settings: spectral.Settings) -> spectral.Estimate:
        return spectral.conv_estimate(c.weight, c.in_shape, stride=c.stride, dilation=c.dilation, groups=c.groups,
                                      pads=[(p, p) for p in c.padding], settings=settings)

    def plain(c: Conv, tol: float, oracle: bool) -> PowerEstimate:
        return plain_power(c.gram(), h.start_vector(c.in_shape, device), tol,
                           ORACLE_MAX_ITERS if oracle else h.MAX_ITERS, reference[c.name] if oracle else None)

    # The oracle row needs each norm before it runs: a float64 Lanczos estimate at 1e-9 is a
    # lower bound within about that of it, so plain power stopped within tol of it is that accurate.
    h.log(f"  {model_name}: float64 reference norms of {len(layers)} layers (untimed) ...")
    ref64 = h.settings(REFERENCE_TOL, device, dtype=torch.float64)
    reference = {c.name: engine(c, ref64).sigma for c in layers}

    jobs: list[h.Job] = []
    for tol in tols:
        jobs.append((h.Row("b", model_name, "plain power", tol), partial(plain, tol=tol, oracle=False)))
        jobs.append((h.Row("b", model_name, h.ORACLE, tol), partial(plain, tol=tol, oracle=True)))
        jobs += [(h.Row("b", model_name, f"lipcheck {m}", tol), partial(engine, settings=h.settings(tol, device, m)))
                 for m in ("power", "lanczos")]
    cheapest = min(range(len(layers)), key=lambda i: layer_bytes[i])
    h.run_jobs(layers, jobs, device, cheapest,
               lambda i, c: f"(b) {c.name} in={c.in_shape[1:]} w={tuple(c.weight.shape)}")
    rows = [r for r, _ in jobs]
    # Every row returns a lower bound (||A x|| for a unit x), so the largest any found is the best reference.
    best = [max(reference[c.name], *vals) for c, vals in zip(layers, zip(*(r.sigmas for r in rows)))]
    h.finish(rows, best, layer_bytes, gbs)
    plain_tight = next(r for r in rows if r.method == "plain power" and r.tol == min(tols))
    return {
        "part": "b", "model": model_name, "input_size": size, "conv_layers_total": len(every),
        "layers": [{"name": c.name, "in_shape": list(c.in_shape), "out_shape": list(c.out_shape),
                    "weight_shape": list(c.weight.shape), "stride": list(c.stride), "padding": list(c.padding),
                    "reference_sigma": s} for c, s in zip(layers, best)],
        "bytes_per_iter": sum(layer_bytes), "floor_per_iter_s": sum(layer_bytes) / (gbs * 1e9),
        "plain_tightest_rel_err_vs_reference": plain_tight.max_rel_err, "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.add_argument("--conv-layers", type=int, default=None, metavar="N",
                    help="measure N Conv2d layers spread over the depth (default: all; --quick: 4)")
    ap.add_argument("--size", type=int, default=224, help="input image size (default 224)")
    ap.epilog = "--quick: ResNet-18 instead of ResNet-50, 4 conv layers, tol 1e-4 only"
    args = ap.parse_args(argv)
    device, facts, bw = h.start(args, "lipcheck benchmark (b): convolution operator norms")
    cap = args.conv_layers if args.conv_layers is not None else (4 if args.quick else None)
    name, model = h.resnet(args.quick)
    t_run = time.perf_counter()
    sec = measure(name, model, device, [1e-4] if args.quick else [1e-4, 1e-6], bw["read_gbs"], cap, args.size)
    h.print_rows(f"(b) {name}: {len(sec['layers'])} of {sec['conv_layers_total']} Conv2d at {args.size}x{args.size}; "
                 f"one forward+adjoint over them moves {sec['bytes_per_iter'] / 1e6:.1f} MB -> floor "
                 f"{sec['floor_per_iter_s'] * 1e3:.2f} ms/iter", sec["rows"], "max rel diff vs best")
    print(f"  (reference per layer = largest estimate of any row; plain power at the tightest tol is "
          f"{sec['plain_tightest_rel_err_vs_reference']:.2e} below it at worst)\n")
    h.write_json(args.json, args, facts, bw, [{**sec, "conv_layers_cap": cap}], time.perf_counter() - t_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
