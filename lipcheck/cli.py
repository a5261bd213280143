"""The ``lipcheck`` command line: parse, call the library, hand the report to one writer.

torch, onnx and rich are imported inside the commands, never at module level, so
``lipcheck --help`` and ``--version`` answer without loading them.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_exceptions

from . import __version__
from .errors import EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, LipcheckError, UsageError
from .options import DEFAULTS, Options

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
    markdown = "markdown"
    junit = "junit"
    html = "html"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Method(str, enum.Enum):
    lanczos = "lanczos"
    power = "power"


class DType(str, enum.Enum):
    float32 = "float32"
    float64 = "float64"


# Options shared by every command that analyses a model, declared once.
MODEL_KINDS = ".onnx, TorchScript, torch.save checkpoint or state_dict, .pt2, .safetensors, or a Hugging Face model folder (or its index .json)"
ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help=f"Model: {MODEL_KINDS}.", show_default=False)]
ModelsArg = Annotated[list[Path], typer.Argument(metavar="MODEL", help=f"Models, each a {MODEL_KINDS}.", show_default=False)]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", metavar="N,C,H,W", help="Input size, batch first, e.g. 1,3,224,224. ONNX: replaces the model's own input size. TorchScript (with --trust), pickled modules and .pt2: the model is traced at this size. state_dicts and safetensors need --model to give the network; model folders do not use it.")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write the report to FILE instead of stdout.")]
TolOpt = Annotated[float, typer.Option("--tol", help="Relative accuracy an estimate stops at: Lanczos by its residual test, power iteration when sigma changes by less than this between steps.")]
MaxItersOpt = Annotated[int, typer.Option("--max-iters", help="An estimate stops after this many steps (reported as not converged).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the start vectors (results are reproducible).")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto takes the GPU when torch sees one.")]
MethodOpt = Annotated[Method, typer.Option("--method", help="lanczos (Krylov, fewer iterations) or power (plain power iteration, the reference).")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Precision of the estimates (certified bounds always use float64).")]
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow what runs code from the file: unpickling modules, .pt2 archives, tracing or rewriting TorchScript. Only for files you trust.")]
ArchOpt = Annotated[str | None, typer.Option("--model", metavar="PACKAGE.MODULE:FACTORY", help="For a state_dict or safetensors file: the code that builds its network (package.module:factory or file.py:factory, called without arguments). The weights are loaded strictly and the network traced at --input-shape. Runs that code, so needs --trust.")]
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


def write_output(text: str, output: Path | None, model: Path | list[Path]) -> None:
    """stdout, or an atomic write: a sibling temp file, then os.replace."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    for m in model if isinstance(model, list) else [model]:
        if output.exists() and m.exists() and os.path.samefile(output, m):
            raise UsageError(f"refusing to write the report over the model file {output}")
    from .files import atomic_write

    atomic_write(output, text.encode("utf-8"))


def _html() -> Any:
    from . import html_report

    return html_report


def _exists(*paths: Path) -> None:
    """A missing input is reported before torch is imported (which takes seconds)."""
    from .errors import InputError

    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise InputError(f"{path} does not exist")


def _analyze_all(models: list[Path], input_shape: str | None, tol: float, max_iters: int, seed: int,
                 device: Device, dtype: DType, method: Method, trust: bool, progress: bool,
                 architecture: str | None = None) -> list[dict]:
    shape = parse_shape(input_shape)
    _exists(*models)
    Options(tol, max_iters, seed, device.value, dtype.value, method.value)  # checked before torch loads
    from .pipeline import make_settings, run_analysis
    from .render import progress_bar

    settings = make_settings(Options(tol, max_iters, seed, device.value, dtype.value, method.value))
    docs = []
    for model in models:
        with progress_bar(progress and sys.stderr.isatty()) as callback:
            analysis = run_analysis(model, shape, settings, trust=trust, progress=callback,  # type: ignore[arg-type]
                                    architecture=architecture)
        docs.append(analysis.report.to_dict())
    return docs


def _emit(text: str | None, table: object, output: Path | None, models: list[Path]) -> None:
    """Machine text to stdout or -o FILE; a rich renderable through the console."""
    if text is not None:
        write_output(text, output, models)
        return
    import io

    from .render import make_console

    if output is None:
        make_console().print(table)
    else:
        buffer = io.StringIO()
        make_console(buffer).print(table)
        write_output(buffer.getvalue(), output, models)


@app.command()
def inspect(
    models: ModelsArg,
    input_shape: InputShapeOpt = None,
    format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    tol: TolOpt = DEFAULTS.tol,
    max_iters: MaxItersOpt = DEFAULTS.max_iters,
    seed: SeedOpt = DEFAULTS.seed,
    device: DeviceOpt = Device(DEFAULTS.device),
    dtype: DTypeOpt = DType(DEFAULTS.dtype),
    method: MethodOpt = Method(DEFAULTS.method),
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
    architecture: ArchOpt = None,
) -> int:
    """Per-layer spectral norms and the network's Lipschitz bound."""
    from . import writers

    docs = _analyze_all(models, input_shape, tol, max_iters, seed, device, dtype, method, trust, progress,
                        architecture)
    if format is OutputFormat.table:
        from rich.console import Group

        from .render import report_renderables

        _emit(None, Group(*[r for doc in docs for r in report_renderables(doc)]), output, models)
        return EXIT_OK
    text = {
        OutputFormat.json: lambda: writers.dumps(writers.bundle(docs)),
        OutputFormat.csv: lambda: writers.inspect_csv(docs),
        OutputFormat.markdown: lambda: writers.inspect_markdown(docs),
        OutputFormat.junit: lambda: writers.inspect_junit(docs),
        OutputFormat.html: lambda: _html().inspect_html(docs),
    }[format]()
    _emit(text, None, output, models)
    return EXIT_OK


@app.command()
def check(
    models: ModelsArg,
    max_lipschitz: Annotated[float | None, typer.Option("--max-lipschitz", help="Fail when the network bound is above this (or there is none).")] = None,
    max_layer_sigma: Annotated[float | None, typer.Option("--max-layer-sigma", help="Fail when any layer's sigma is above this.")] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", help="An earlier `inspect --format json` report to compare against.")] = None,
    max_increase: Annotated[str, typer.Option("--max-increase", help="With --baseline: allowed growth of the bound and of each layer, e.g. 10%.")] = "0%",
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="With --baseline: compare the layers found on both sides by name and pass when some are on one side only (by default such a layer fails the gate).")] = False,
    bound: Annotated[str, typer.Option("--bound", help="certified (upper bounds, the default) or estimate (power iteration, lower bounds).")] = "certified",
    input_shape: InputShapeOpt = None,
    format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    tol: TolOpt = DEFAULTS.tol,
    max_iters: MaxItersOpt = DEFAULTS.max_iters,
    seed: SeedOpt = DEFAULTS.seed,
    device: DeviceOpt = Device(DEFAULTS.device),
    dtype: DTypeOpt = DType(DEFAULTS.dtype),
    method: MethodOpt = Method(DEFAULTS.method),
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
    architecture: ArchOpt = None,
) -> int:
    """A robustness gate: exit 0 when every rule holds, 1 when one fails (one line each on stderr)."""
    from . import gate, writers

    if max_lipschitz is None and max_layer_sigma is None and baseline is None:
        raise UsageError("check needs at least one rule: --max-lipschitz, --max-layer-sigma or --baseline")
    for name, value in (("--max-lipschitz", max_lipschitz), ("--max-layer-sigma", max_layer_sigma)):
        if value is not None and not value > 0:
            raise UsageError(f"{name} must be a positive number, got {value}")
    if bound not in ("certified", "estimate"):
        raise UsageError(f"--bound must be certified or estimate, got '{bound}'")
    increase = gate.parse_increase(max_increase)
    if baseline is not None and not baseline.is_file():
        raise UsageError(f"--baseline {baseline} does not exist")
    docs = _analyze_all(models, input_shape, tol, max_iters, seed, device, dtype, method, trust, progress,
                        architecture)
    results = []
    for doc in docs:
        base = gate.load_baseline(baseline, doc["model"]["path"]) if baseline is not None else None
        results += gate.evaluate(doc, max_lipschitz=max_lipschitz, max_layer_sigma=max_layer_sigma,
                                 baseline=base, max_increase=increase, bound=bound,
                                 allow_unmatched=allow_unmatched)
    if format is OutputFormat.table:
        from .render import check_table

        _emit(None, check_table(results), output, models)
    else:
        text = {
            OutputFormat.json: lambda: writers.dumps(writers.check_document(docs, results)),
            OutputFormat.csv: lambda: writers.check_csv(results),
            OutputFormat.markdown: lambda: writers.check_markdown(results),
            OutputFormat.junit: lambda: writers.check_junit(results),
            OutputFormat.html: lambda: _html().check_html(docs, results),
        }[format]()
        _emit(text, None, output, models)
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"lipcheck: gate failed: {r.model}: {r.rule}: {r.message}", file=sys.stderr)
    return EXIT_GATE_FAILED if failed else EXIT_OK


def _is_report(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(1) == b"{"


def _report_or_model(path: Path, shape: str | None, tol: float, max_iters: int, seed: int, device: Device,
                     dtype: DType, method: Method, trust: bool, progress: bool) -> dict:
    """A lipcheck JSON report is read as it is; anything else is analysed as a model."""
    import json

    if path.is_file():
        with path.open("rb") as fh:
            head = fh.read(1)
        if head == b"{":
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UsageError(f"{path} looks like JSON but does not parse: {exc}") from None
            if isinstance(doc, dict) and "layers" in doc and "network" in doc:
                return doc
            raise UsageError(f"{path} is JSON but not a single lipcheck inspect report")
    return _analyze_all([path], shape, tol, max_iters, seed, device, dtype, method, trust, progress)[0]


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="A report (inspect --format json) or a model.", show_default=False)],
    b: Annotated[Path, typer.Argument(help="A report or a model to compare with A.", show_default=False)],
    input_shape: InputShapeOpt = None,
    format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    tol: TolOpt = DEFAULTS.tol,
    max_iters: MaxItersOpt = DEFAULTS.max_iters,
    seed: SeedOpt = DEFAULTS.seed,
    device: DeviceOpt = Device(DEFAULTS.device),
    dtype: DTypeOpt = DType(DEFAULTS.dtype),
    method: MethodOpt = Method(DEFAULTS.method),
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
) -> int:
    """Per-layer and network changes between two reports or models, new and vanished layers."""
    from . import writers
    from .diff import diff as compute_diff
    from .report import json_safe

    _exists(a, b)
    docs = [_report_or_model(p, input_shape, tol, max_iters, seed, device, dtype, method, trust, progress) for p in (a, b)]
    result = compute_diff(docs[0], docs[1])
    if input_shape is None and not any(_is_report(p) for p in (a, b)):
        # Two checkpoints of weights: the norm of each matrix's change, read pair by pair.
        from .pipeline import make_settings
        from .render import progress_bar
        from .updates import update_norms, weights_of

        wa, wb = weights_of(a, trust), weights_of(b, trust)
        if wa is not None and wb is not None:
            settings = make_settings(Options(tol, max_iters, seed, device.value, dtype.value, method.value))
            with progress_bar(progress and sys.stderr.isatty()) as callback:
                result["updates"] = update_norms(wa, wb, settings, callback)  # type: ignore[arg-type]
    doc = json_safe(result)
    if format is OutputFormat.table:
        from .render import diff_table

        _emit(None, diff_table(doc), output, [a, b])
        return EXIT_OK
    text = {
        OutputFormat.json: lambda: writers.dumps(doc),
        OutputFormat.csv: lambda: writers.diff_csv(doc),
        OutputFormat.markdown: lambda: writers.diff_markdown(doc),
        OutputFormat.junit: lambda: writers.diff_junit(doc),
        OutputFormat.html: lambda: _html().diff_html(doc),
    }[format]()
    _emit(text, None, output, [a, b])
    return EXIT_OK


@app.command()
def schema() -> int:
    """Print the JSON Schema of lipcheck's JSON reports."""
    from importlib.resources import files

    sys.stdout.write(files("lipcheck").joinpath("schema.json").read_text(encoding="utf-8"))
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
    mode: Annotated[Mode, typer.Option("--mode", help="bake: rescale the weights themselves, same format as the input. parametrize: register torch's spectral_norm plus a fixed lipcheck Scale on each Linear/Conv and write a torch.save file {format, layers, state_dict} that lipcheck.parametrize.load puts back into the same architecture.")] = Mode.bake,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Only layers whose name matches this glob (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Skip layers whose name matches this glob (repeatable).")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow the output to be the input file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the before/after comparison as JSON.")] = None,
    input_shape: InputShapeOpt = None,
    tol: TolOpt = DEFAULTS.tol,
    max_iters: MaxItersOpt = DEFAULTS.max_iters,
    seed: SeedOpt = DEFAULTS.seed,
    device: DeviceOpt = Device(DEFAULTS.device),
    dtype: DTypeOpt = DType(DEFAULTS.dtype),
    method: MethodOpt = Method(DEFAULTS.method),
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
    architecture: ArchOpt = None,
) -> int:
    """Rewrite a model with spectrally normalized layers, then re-inspect it to prove it."""
    shape = parse_shape(input_shape)
    _exists(model)
    Options(tol, max_iters, seed, device.value, dtype.value, method.value)  # checked before torch loads
    from .normalization import normalize as run_normalize
    from .pipeline import make_settings
    from .render import make_console, normalize_summary, normalize_table, progress_bar

    settings = make_settings(Options(tol, max_iters, seed, device.value, dtype.value, method.value))
    if report is not None:
        check_report_path(report, model, output)
    with progress_bar(progress and sys.stderr.isatty()) as callback:
        result = run_normalize(model, output, target=target, clip=clip, budget=budget, layers=layers,
                               exclude=exclude, in_place=in_place, force=force, input_shape=shape,
                               settings=settings, trust=trust, mode=mode.value,
                               progress=callback, architecture=architecture)  # type: ignore[arg-type]
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


# Library parameters whose flag is not the parameter's name with dashes.
FLAGS = {"architecture": "--model"}


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
    except click_exceptions.NoArgsIsHelpError as exc:
        # Bare `lipcheck` (or a group without a command): the help, as --help shows it.
        sys.stdout.write(exc.format_message().rstrip("\n") + "\n")
        return EXIT_OK
    except click_exceptions.ClickException as exc:
        print(f"lipcheck: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return UsageError.exit_code
    except LipcheckError as exc:
        print(f"lipcheck: error: {exc.for_cli(FLAGS)}", file=sys.stderr)
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
