"""Regenerate the sample model files in ``samples/``.

Usage::

    python samples/make_samples.py [OUTPUT_DIR]

For each of ``mlp``, ``cnn`` and ``resnet`` (from :mod:`lipcheck.testing`, seed 0) writes:

* ``<name>.onnx``            legacy TorchScript-based ONNX export, opset 17, BatchNorm kept
* ``<name>.ts.pt``           ``torch.jit.trace`` + ``torch.jit.save``
* ``<name>.state_dict.pt``   ``torch.save(model.state_dict())``
* ``<name>.pickle.pt``       ``torch.save(model)`` (needs ``lipcheck.testing`` importable and
                             ``torch.load(..., weights_only=False)`` to load)

OUTPUT_DIR defaults to the directory containing this script.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from lipcheck.testing import make_cnn, make_mlp, make_resnet  # noqa: E402

SAMPLE_BUILDERS = {"mlp": make_mlp, "cnn": make_cnn, "resnet": make_resnet}
SEED = 0


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """Export with the legacy (non-dynamo) exporter, which keeps BatchNormalization nodes."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
        )


def write_samples(out_dir: Path) -> list[Path]:
    """Write all sample files into ``out_dir`` and return their paths in write order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, builder in SAMPLE_BUILDERS.items():
        model, shape = builder(SEED)
        model.eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))

        path = out_dir / f"{name}.onnx"
        export_onnx(model, x, path)
        written.append(path)

        path = out_dir / f"{name}.ts.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, x)
            torch.jit.save(traced, str(path))  # deprecated in recent torch; still works
        written.append(path)

        path = out_dir / f"{name}.state_dict.pt"
        torch.save(model.state_dict(), path)
        written.append(path)

        path = out_dir / f"{name}.pickle.pt"
        torch.save(model, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else Path(__file__).resolve().parent
    total = 0
    for path in write_samples(out_dir):
        size = path.stat().st_size
        total += size
        print(f"wrote {path} ({size:,} bytes)")
    print(f"total {total:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
