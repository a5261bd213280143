"""The whole tool: ``lipcheck.analyze`` of a seeded ResNet saved as ONNX, timed.

This is what ``lipcheck inspect`` runs, with default settings (tol 1e-6, Lanczos, float32
estimates, float64 certificates): loading, graph, every layer's estimate and certificate,
and the composed bound. One untimed warm-up run at tol 1e-2 pays the imports and first calls.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _harness as h
import torch

import lipcheck


def main(argv: Sequence[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.add_argument("--size", type=int, default=224, help="input image size (default 224)")
    ap.epilog = "--quick: ResNet-18 instead of ResNet-50"
    args = ap.parse_args(argv)
    device, facts, bw = h.start(args, "lipcheck benchmark (c): lipcheck.analyze of a ResNet as ONNX", engine=False)
    name, model = h.resnet(args.quick)
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        h.log(f"exporting {name} to ONNX ...")
        torch.onnx.export(model, (torch.zeros(1, 3, args.size, args.size),), str(path), dynamo=False,
                          opset_version=17)
        lipcheck.analyze(path, device=device, tol=1e-2, max_iters=2)
        h.log("analysing ...")
        report, wall = h.timed(device, lambda: lipcheck.analyze(path, device=device))
    net = report.network
    print(f"(c) lipcheck.analyze of {name} as ONNX at {args.size}x{args.size} (default settings {report.settings}):")
    estimate = "-" if net.lipschitz_estimate is None else f"{net.lipschitz_estimate:.6g}"
    print(f"  {wall:.2f} s for {len(report.layers)} layer rows; certified bound {net.lipschitz_bound:.6g}, "
          f"estimate {estimate}\n")
    section = {"part": "c", "model": name, "input_size": args.size, "wall_s": wall, "layers": len(report.layers),
               "lipschitz_bound": net.lipschitz_bound, "lipschitz_estimate": net.lipschitz_estimate,
               "settings": report.settings}
    h.write_json(args.json, args, facts, bw, [section], time.perf_counter() - t_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
