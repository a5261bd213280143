"""The ``lipcheck`` command line: parse, call the library, hand the report to one writer.

torch, onnx and rich are imported inside the commands, never at module level, so
``lipcheck --help`` and ``--version`` answer without loading them.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer._click import exceptions as click_exceptions

from . import __version__
from .errors import EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, LipcheckError, UsageError

app = typer.Typer(
    name="lipcheck",
    help="Per-layer spectral norms and a certified Lipschitz bound for PyTorch and ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, enum.Enum):
    float32 = "float32"
    float64 = "float64"


# Options shared by every command that analyses a model, declared once.
ModelArg = Annotated[Path, typer.Argument(help="Model file: .onnx, TorchScript, torch.save checkpoint or state_dict, .pt2.", show_default=False)]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", help="Input size, batch first, e.g. 1,3,224,224. Needed for TorchScript and pickled modules; overrides an ONNX model's own.")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to FILE instead of stdout.")]
TolOpt = Annotated[float, typer.Option("--tol", help="Power iteration stops when the relative change of sigma is below this.")]
MaxItersOpt = Annotated[int, typer.Option("--max-iters", help="Power iteration stops after this many iterations (reported as not converged).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the power-iteration start vectors.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto takes the GPU when torch sees one.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Precision of the estimates (certified bounds always use float64).")]
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow loading files that run code when unpickled (pickled modules, .pt2). Only for files you trust.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr (shown only on a terminal).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lipcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Exit codes: 0 ok, 1 a gate failed, 2 bad usage or unreadable/invalid input, 3 internal error."""


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape must be integers like 1,3,224,224, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be positive integers like 1,3,224,224, got '{text}'")
    return dims


def write_output(text: str, output: Path | None, model: Path) -> None:
    """stdout, or an atomic write: a sibling temp file, then os.replace."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if output.exists() and model.exists() and os.path.samefile(output, model):
        raise UsageError(f"refusing to write the report over the model file {output}")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {output}: folder {folder} does not exist")
    tmp = folder / f".{output.name}.lipcheck-tmp-{os.getpid()}"
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


@app.command()
def inspect(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    tol: TolOpt = 1e-6,
    max_iters: MaxItersOpt = 1000,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.float32,
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
) -> int:
    """Per-layer spectral norms and the network's Lipschitz bound."""
    shape = parse_shape(input_shape)
    from .api import analyze
    from .render import progress_bar

    with progress_bar(progress and sys.stderr.isatty()) as callback:
        report = analyze(model, shape, tol=tol, max_iters=max_iters, seed=seed,
                         device=device.value, dtype=dtype.value, trust=trust,
                         progress=callback)  # type: ignore[arg-type]
    if format is OutputFormat.table:
        import io

        from .render import make_console, print_report

        if output is None:
            print_report(report, make_console())
        else:
            buffer = io.StringIO()
            print_report(report, make_console(buffer))
            write_output(buffer.getvalue(), output, model)
        return EXIT_OK
    from .report import to_csv, to_json

    text = to_json(report) if format is OutputFormat.json else to_csv(report)
    write_output(text, output, model)
    return EXIT_OK


class Mode(str, enum.Enum):
    bake = "bake"
    parametrize = "parametrize"


@app.command()
def normalize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the normalized model (same format as the input).", show_default=False)],
    target: Annotated[float | None, typer.Option("--target", help="Spectral norm each selected layer gets (default 1.0; with --budget, at most this).")] = None,
    clip: Annotated[bool, typer.Option("--clip", help="Only rescale layers above the target; the others stay bit-identical.")] = False,
    budget: Annotated[float | None, typer.Option("--budget", help="Pick one per-layer target so the network bound is at most this.")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="bake: rescale the weights themselves. parametrize: register torch spectral_norm (plus a fixed lipcheck Scale) on each layer and save a pickled nn.Module.")] = Mode.bake,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Only layers whose name matches this glob (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Skip layers whose name matches this glob (repeatable).")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow the output to be the input file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the before/after comparison as JSON.")] = None,
    input_shape: InputShapeOpt = None,
    tol: TolOpt = 1e-6,
    max_iters: MaxItersOpt = 1000,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.float32,
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
) -> int:
    """Rewrite a model with spectrally normalized layers, then re-inspect it to prove it."""
    shape = parse_shape(input_shape)
    from .api import make_settings
    from .normalize import normalize as run_normalize
    from .render import make_console, normalize_summary, normalize_table, progress_bar

    settings = make_settings(tol, max_iters, seed, device.value, dtype.value)
    if report is not None:
        check_report_path(report, model, output)
    with progress_bar(progress and sys.stderr.isatty()) as callback:
        result = run_normalize(model, output, target=target, clip=clip, budget=budget, layers=layers,
                               exclude=exclude, in_place=in_place, force=force, input_shape=shape,
                               settings=settings, trust=trust, mode=mode.value,
                               progress=callback)  # type: ignore[arg-type]
    console = make_console()
    console.print(normalize_table(result))
    console.print(normalize_summary(result), end="")
    if report is not None:
        import json

        write_output(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n", report, model)
    return EXIT_OK if result.ok else EXIT_GATE_FAILED


def check_report_path(report: Path, *inputs: Path) -> None:
    for other in inputs:
        if report.resolve() == other.resolve():
            raise UsageError(f"--report {report} would overwrite {other}")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every known error becomes one stderr line."""
    try:
        result = app(args=argv, prog_name="lipcheck", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("lipcheck: aborted", file=sys.stderr)
        return 130
    except click_exceptions.ClickException as exc:
        print(f"lipcheck: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return UsageError.exit_code
    except LipcheckError as exc:
        print(f"lipcheck: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lipcheck: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence, kept loud
        if os.environ.get("LIPCHECK_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"lipcheck: internal error: {type(exc).__name__}: {first} "
              "(a bug in lipcheck; rerun with LIPCHECK_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def main() -> None:
    sys.exit(run())
