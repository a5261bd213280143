"""The ``lipcheck`` command line: parse, call the library, hand the report to one writer.

torch, onnx and rich are imported inside the commands, never at module level, so
``lipcheck --help`` and ``--version`` answer without loading them.
"""

from __future__ import annotations

import contextlib
import enum
import io
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_exceptions
from typer.core import TyperArgument, TyperCommand

from . import __version__
from .errors import EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_OK, LipcheckError, UsageError
from .options import DEFAULTS, Options

app = typer.Typer(
    name="lipcheck",
    help="Per-layer spectral norms and a certified Lipschitz bound for PyTorch and ONNX models.",
    epilog="Exit codes: 0 ok; 1 a gate failed; 2 bad usage (lipcheck without a command prints this help "
           "on stderr and exits 2, as click does) or an unreadable, invalid or untrusted input; "
           "3 internal error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Command(TyperCommand):
    """A command whose help names its arguments as click does (``MODEL...``, ``A B``),
    without typer's type labels (``{MODEL}...``, ``MODEL <list[Path]>``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_label(p, usage=True) for p in self.get_params(ctx) if isinstance(p, TyperArgument)]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                if not param.hidden:
                    arguments.append((_argument_label(param), param.help or ""))
            elif (record := param.get_help_record(ctx)) is not None:
                options.append(record)
        for title, records in (("Arguments", arguments), ("Options", options)):
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def _argument_label(param: TyperArgument, usage: bool = False) -> str:
    label = param.metavar or (param.name or "").upper()
    if param.nargs != 1:
        label += "..."
    return f"[{label}]" if usage and not param.required else label


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


class Certify(str, enum.Enum):
    auto = "auto"
    exact = "exact"
    probabilistic = "probabilistic"


class DType(str, enum.Enum):
    float32 = "float32"
    float64 = "float64"


# Options shared by every command that analyses a model, declared once.
MODEL_KINDS = ".onnx, TorchScript, torch.save checkpoint or state_dict, .pt2, .safetensors, or a Hugging Face model folder (or its index .json)"
ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help=f"Model: {MODEL_KINDS}.", show_default=False)]
ModelsArg = Annotated[list[Path], typer.Argument(metavar="MODEL", help=f"Models, each a {MODEL_KINDS}.", show_default=False)]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", metavar="N,C,H,W", help="Input size, batch first, e.g. 1,3,224,224 (a convolution's norm depends on it). ONNX: overrides the input size stored in the model. TorchScript: the model is traced at this size, which runs its code, so needs --trust (without --input-shape only its weights are read). Pickled modules (--trust) and .pt2: traced at this size (a .pt2 otherwise at the size it was exported with). state_dicts and safetensors files hold no network: they need --model. Not accepted for model folders.")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write the report to FILE instead of stdout.")]
TolOpt = Annotated[float, typer.Option("--tol", metavar="FLOAT", help="Relative accuracy an estimate stops at: Lanczos by its residual test, power iteration when sigma changes by less than this between steps.")]
MaxItersOpt = Annotated[int, typer.Option("--max-iters", metavar="N", help="An estimate stops after this many steps (reported as not converged).")]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the start vectors (results are reproducible).")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto takes the GPU when torch sees one.")]
MethodOpt = Annotated[Method, typer.Option("--method", help="lanczos (Krylov, fewer iterations) or power (plain power iteration, the reference).")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Precision of the estimates (certified bounds always use float64).")]
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow what runs code from the file: unpickling modules, .pt2 archives, tracing or rewriting TorchScript, importing --model. Only for files you trust.")]
ArchOpt = Annotated[str | None, typer.Option("--model", metavar="PACKAGE.MODULE:FACTORY", help="For a state_dict or safetensors file: the code that builds its network (package.module:factory or file.py:factory, called without arguments). The weights are loaded strictly and the network traced at --input-shape. Runs that code, so needs --trust.")]
CertifyOpt = Annotated[Certify, typer.Option("--certify", help="Upper bounds of dense matrices: exact (deterministic certificate, O(n^3)), probabilistic (from a random-start Lanczos run, O(k n^2), fails with probability at most --failure-probability per layer; reported as such), or auto (exact where cheap, probabilistic on large matrices).")]
FailureProbOpt = Annotated[float, typer.Option("--failure-probability", metavar="DELTA", help="Failure probability of each probabilistic upper bound (the network's is their sum).")]
EmpiricalOpt = Annotated[bool, typer.Option("--empirical", help="Also run the model (float64; ONNX files through onnx2torch) and search for inputs where its Jacobian is largest: a true lower bound on the network's constant, shown with the ratio certified/lower. Off by default (it runs the model, seconds on small ones).")]
FromOpt = Annotated[str | None, typer.Option("--from", metavar="NODE", help="Start the network bound at this node, layer or value (e.g. the token embedding's output), everything not computed from it held fixed; a graph model only.", show_default=False)]
RangeOpt = Annotated[str | None, typer.Option("--input-range", metavar="LO,HI", help="Declare the inputs' range: LO,HI for every element, or LO,HI;LO,HI;... one per channel (axis 1). Interval propagation then gives products (gating, squeeze-excitation), division, attention, exp/log and normalisation local constants on that domain; the network bound then holds for inputs in it only, and every output says so.", show_default=False)]
RadiusOpt = Annotated[float | None, typer.Option("--input-radius", metavar="R", help="Declare the inputs to lie within L2 distance R of the --input-range's middle (of 0 without one); see --input-range.", show_default=False)]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr (shown only on a terminal).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lipcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """The options of ``lipcheck`` itself; the exit codes are in the app's epilog."""


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
    _check_report_path(output, model if isinstance(model, list) else [model])
    from .files import atomic_write

    atomic_write(output, text.encode("utf-8"))


# --------------------------------------------------------------------------- checks
# Everything the command line can tell from its arguments alone is checked before torch,
# onnx or rich are imported: importing torch takes seconds, a typo should not.


def _check_inputs(*paths: Path) -> None:
    """Each input exists (click's Path type has refused an unreadable one already)."""
    from .errors import InputError

    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise InputError(f"{path} does not exist")


def _check_report_path(output: Path | None, inputs: list[Path]) -> None:
    """A report (``-o``) goes into an existing folder and never over an input."""
    if output is None:
        return
    for path in inputs:
        if output.exists() and path.exists() and os.path.samefile(output, path):
            raise UsageError(f"refusing to write the report over the model file {output}")
    if output.is_dir():
        raise UsageError(f"cannot write {output}: it is a directory")
    from .files import require_parent_folder

    require_parent_folder(output)


def _check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def _check_architecture(spec: str | None) -> None:
    """``--model``'s form and its file (lipcheck.architecture.build checks the same after
    importing torch; --trust is asked for there, once the input is known to need --model)."""
    if spec is None:
        return
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"--model must look like package.module:factory or file.py:factory, got '{spec}'")
    if target.endswith(".py") and not Path(target).is_file():
        raise UsageError(f"--model: {target} is not a file")


def _analyze_all(models: list[Path], input_shape: str | None, tol: float, max_iters: int, seed: int,
                 device: Device, dtype: DType, method: Method, trust: bool, progress: bool,
                 architecture: str | None = None, *, certify: Certify = Certify(DEFAULTS.certify),
                 failure_probability: float = DEFAULTS.failure_probability,
                 empirical: bool = False, per_head: bool = False, start: str | None = None,
                 input_range: str | None = None, input_radius: float | None = None) -> list[dict]:
    shape = parse_shape(input_shape)
    _check_inputs(*models)
    _check_architecture(architecture)
    options = Options(tol, max_iters, seed, device.value, dtype.value, method.value, certify.value,
                      failure_probability)  # checked before torch loads
    domain = None
    if input_range is not None or input_radius is not None:  # lipcheck.interval needs numpy and onnx
        from .interval import parse_domain

        domain = parse_domain(input_range, input_radius)
    from .pipeline import make_settings, run_analysis
    from .render import progress_bar

    settings = make_settings(options)
    from . import distributed

    world = distributed.world_from_env()
    spread = distributed.Spread(world) if world is not None else None

    def analyze_each() -> list[dict]:  # type: ignore[type-arg]
        docs = []
        for model in models:
            with progress_bar(progress and sys.stderr.isatty() and (world is None or world.leader)) as callback:
                try:
                    analysis = run_analysis(model, shape, settings, trust=trust, progress=callback,  # type: ignore[arg-type]
                                            architecture=architecture, empirical=empirical, per_head=per_head,
                                            spread=spread, start=start, domain=domain)
                except distributed.NotMine:
                    continue  # under torchrun, a model with a graph: rank 0 analyses it alone
            docs.append(analysis.report.to_dict())
        return docs

    if world is None:
        return analyze_each()
    # Under torchrun: every process runs this; the tensors are shared out, rank 0 reports.
    docs, failure = [], None
    with distributed.process_group(world):
        try:
            docs = analyze_each()
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it (settle re-raises)
            failure = exc
        if not world.leader:
            # Rank 0 reports (the report, or the error of whichever rank failed) and carries the
            # exit code; the others end quietly, so the launcher does not stop rank 0 mid-report.
            with contextlib.suppress(Exception):
                distributed.settle(world, failure)
            raise typer.Exit(EXIT_OK)
        distributed.settle(world, failure)
    return docs


def _emit(text: str | None, table: object, output: Path | None, models: list[Path]) -> None:
    """Machine text to stdout or -o FILE; a rich renderable through the console."""
    if text is not None:
        write_output(text, output, models)
        return
    from .render import make_console

    if output is None:
        make_console().print(table)
    else:
        buffer = io.StringIO()
        make_console(buffer).print(table)
        write_output(buffer.getvalue(), output, models)


def _chart_paths(output: Path, count: int) -> list[Path]:
    """report.md -> report.svg (one chart) or report-1.svg, report-2.svg, ... beside it."""
    if count == 1:
        return [output.with_name(output.stem + ".svg")]
    return [output.with_name(f"{output.stem}-{i}.svg") for i in range(1, count + 1)]


def _markdown_with_charts(text: str, kind: str, docs: list[dict], output: Path | None,  # type: ignore[type-arg]
                          inputs: list[Path]) -> str:
    """For ``--format markdown -o FILE``: write each chart as an SVG file beside FILE and link it
    from the Markdown (relative links, as a pull-request comment or a repository page shows them).
    On stdout there is no file to link from: the Markdown is returned as it is."""
    if output is None:
        return text
    from .files import atomic_write
    from .html_report import markdown_charts

    charts = markdown_charts(kind, docs)
    paths = _chart_paths(output, len(charts))
    for path in paths:
        _check_report_path(path, inputs)
    for (_, svg), path in zip(charts, paths):
        atomic_write(path, (svg + "\n").encode("utf-8"))
    links = "".join(f"\n![{alt.replace('[', '(').replace(']', ')')}]({path.name})\n"
                    for (alt, _), path in zip(charts, paths))
    return text.rstrip("\n") + "\n" + links if links else text


@app.command(cls=Command)
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
    certify: CertifyOpt = Certify(DEFAULTS.certify),
    failure_probability: FailureProbOpt = DEFAULTS.failure_probability,
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
    architecture: ArchOpt = None,
    empirical: EmpiricalOpt = False,
    per_head: Annotated[bool, typer.Option("--per-head", help="For a model folder whose config.json gives the attention heads: also one row per head of each q/k/v/o projection (named <matrix>[h3], kind head; not gated).")] = False,
    start: FromOpt = None,
    input_range: RangeOpt = None,
    input_radius: RadiusOpt = None,
) -> int:
    """Per-layer spectral norms and the network's Lipschitz bound."""
    from . import writers

    _check_report_path(output, models)
    docs = _analyze_all(models, input_shape, tol, max_iters, seed, device, dtype, method, trust, progress,
                        architecture, certify=certify, failure_probability=failure_probability,
                        empirical=empirical, per_head=per_head, start=start, input_range=input_range,
                        input_radius=input_radius)
    if format is OutputFormat.table:
        from rich.console import Group

        from .render import report_renderables

        _emit(None, Group(*[r for doc in docs for r in report_renderables(doc)]), output, models)
        return EXIT_OK
    text = writers.write(format.value, "inspect", docs)
    if format is OutputFormat.markdown:
        text = _markdown_with_charts(text, "inspect", docs, output, models)
    _emit(text, None, output, models)
    return EXIT_OK


@app.command(cls=Command)
def check(
    models: ModelsArg,
    max_lipschitz: Annotated[float | None, typer.Option("--max-lipschitz", metavar="L", help="Fail when the network bound is above this (or there is none).")] = None,
    max_layer_sigma: Annotated[float | None, typer.Option("--max-layer-sigma", metavar="SIGMA", help="Fail when any layer's sigma is above this.")] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", metavar="REPORT|CHECKPOINT", help="An earlier `inspect --format json` report to compare against; with --max-delta-sigma or --max-relative-delta, the earlier checkpoint (file or model folder) whose weights the update norms are taken from.")] = None,
    max_delta_sigma: Annotated[float | None, typer.Option("--max-delta-sigma", metavar="X", help="With --baseline CHECKPOINT: fail when a matrix's update sigma(W - W_baseline) (certified upper bound) is above X.")] = None,
    max_relative_delta: Annotated[float | None, typer.Option("--max-relative-delta", metavar="X", help="With --baseline CHECKPOINT: fail when a matrix's sigma(W - W_baseline) / sigma(W_baseline) (an upper bound on it) is above X, e.g. 0.05.")] = None,
    max_increase: Annotated[str, typer.Option("--max-increase", metavar="PCT", help="With --baseline: allowed growth of the bound and of each layer, e.g. 10%.")] = "0%",
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="With --baseline: compare the layers found on both sides by name and pass when some are on one side only (by default such a layer fails the gate).")] = False,
    bound: Annotated[str, typer.Option("--bound", metavar="certified|estimate", help="certified (upper bounds, the default) or estimate (the Lanczos estimates, or power iteration with --method power: lower bounds).")] = "certified",
    input_shape: InputShapeOpt = None,
    format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    tol: TolOpt = DEFAULTS.tol,
    max_iters: MaxItersOpt = DEFAULTS.max_iters,
    seed: SeedOpt = DEFAULTS.seed,
    device: DeviceOpt = Device(DEFAULTS.device),
    dtype: DTypeOpt = DType(DEFAULTS.dtype),
    method: MethodOpt = Method(DEFAULTS.method),
    certify: CertifyOpt = Certify(DEFAULTS.certify),
    failure_probability: FailureProbOpt = DEFAULTS.failure_probability,
    require_certified: Annotated[bool, typer.Option("--require-certified", help="Fail a rule on an upper bound that is probabilistic rather than certified (see --certify).")] = False,
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
    architecture: ArchOpt = None,
    start: FromOpt = None,
    input_range: RangeOpt = None,
    input_radius: RadiusOpt = None,
) -> int:
    """A robustness gate: exit 0 when every rule holds, 1 when one fails (one line each on stderr)."""
    from . import gate, writers

    if max_lipschitz is None and max_layer_sigma is None and baseline is None:
        raise UsageError("check needs at least one rule: --max-lipschitz, --max-layer-sigma or --baseline")
    _check_positive(max_lipschitz=max_lipschitz, max_layer_sigma=max_layer_sigma)
    updates_gated = max_delta_sigma is not None or max_relative_delta is not None
    if updates_gated:
        if baseline is None:
            raise UsageError("--max-delta-sigma and --max-relative-delta need --baseline CHECKPOINT "
                             "(the earlier weights the update is measured from)")
        for flag, value in (("--max-delta-sigma", max_delta_sigma), ("--max-relative-delta", max_relative_delta)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{flag} must be a non-negative number, got {value}")
        if not baseline.exists():
            raise UsageError(f"--baseline {baseline} does not exist")
        if _is_report(baseline):
            raise UsageError(f"--baseline {baseline} is a JSON report; update norms need the earlier "
                             "checkpoint's weights (a safetensors/torch file or a model folder)")
    if bound not in ("certified", "estimate"):
        raise UsageError(f"--bound must be certified or estimate, got '{bound}'")
    increase = gate.parse_increase(max_increase)
    if baseline is not None and not updates_gated and not baseline.is_file():
        raise UsageError(f"--baseline {baseline} does not exist")
    _check_report_path(output, models)
    docs = _analyze_all(models, input_shape, tol, max_iters, seed, device, dtype, method, trust, progress,
                        architecture, certify=certify, failure_probability=failure_probability, start=start,
                        input_range=input_range, input_radius=input_radius)
    results = []
    for doc in docs:
        base = gate.load_baseline(baseline, doc["model"]["path"]) if baseline is not None and not updates_gated else None
        results += gate.evaluate(doc, max_lipschitz=max_lipschitz, max_layer_sigma=max_layer_sigma,
                                 baseline=base, max_increase=increase, bound=bound,
                                 allow_unmatched=allow_unmatched, require_certified=require_certified)
        if updates_gated:
            assert baseline is not None
            results += _update_gates(Path(doc["model"]["path"]), baseline, max_delta_sigma, max_relative_delta,
                                     allow_unmatched, trust, seed, tol, max_iters)
    if format is OutputFormat.table:
        from .render import check_table

        _emit(None, check_table(results), output, models)
    else:
        text = writers.write(format.value, "check", docs, results)
        if format is OutputFormat.markdown:
            text = _markdown_with_charts(text, "check", docs, output, models)
        _emit(text, None, output, models)
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"lipcheck: gate failed: {r.model}: {r.rule}: {r.message}", file=sys.stderr)
    return EXIT_GATE_FAILED if failed else EXIT_OK


def _update_gates(model: Path, baseline: Path, max_delta_sigma: float | None, max_relative_delta: float | None,
                  allow_unmatched: bool, trust: bool, seed: int, tol: float, max_iters: int) -> list:
    """The update-norm rules of ``model`` against the checkpoint ``baseline`` (lipcheck.updates)."""
    from . import spectral, updates

    a, b = updates.weights_of(baseline, trust), updates.weights_of(model, trust)
    if a is None or b is None:
        raise UsageError(f"update norms need stored weights on both sides; "
                         f"{baseline if a is None else model} is a graph (ONNX): compare the checkpoints")
    import torch

    # float64: sigma_a must be a lower bound of sigma(W_baseline) for the relative bound to hold
    settings = spectral.Settings(tol=tol, max_iters=max_iters, seed=seed, dtype=torch.float64)
    rows = updates.update_norms(a, b, settings)
    return updates.update_rules(str(model), str(baseline), a, b, rows, max_delta_sigma=max_delta_sigma,
                                max_relative_delta=max_relative_delta, allow_unmatched=allow_unmatched)


def _is_report(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(1) == b"{"


def _report_or_model(path: Path, shape: str | None, tol: float, max_iters: int, seed: int, device: Device,
                     dtype: DType, method: Method, trust: bool, progress: bool,
                     certify: Certify = Certify(DEFAULTS.certify),
                     failure_probability: float = DEFAULTS.failure_probability) -> dict:
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
    return _analyze_all([path], shape, tol, max_iters, seed, device, dtype, method, trust, progress,
                        certify=certify, failure_probability=failure_probability)[0]


@app.command(cls=Command)
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
    certify: CertifyOpt = Certify(DEFAULTS.certify),
    failure_probability: FailureProbOpt = DEFAULTS.failure_probability,
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
) -> int:
    """Per-layer and network changes between two reports or models, new and vanished layers."""
    from . import writers
    from .diff import diff as compute_diff
    from .report import json_safe

    _check_inputs(a, b)
    parse_shape(input_shape)
    Options(tol, max_iters, seed, device.value, dtype.value, method.value, certify.value, failure_probability)
    _check_report_path(output, [a, b])
    docs = [_report_or_model(p, input_shape, tol, max_iters, seed, device, dtype, method, trust, progress,
                             certify, failure_probability) for p in (a, b)]
    result = compute_diff(docs[0], docs[1])
    if input_shape is None and not any(_is_report(p) for p in (a, b)):
        # Two checkpoints of weights: the norm of each matrix's change, read pair by pair.
        from .pipeline import make_settings
        from .render import progress_bar
        from .updates import update_norms, weights_of

        wa, wb = weights_of(a, trust), weights_of(b, trust)
        if wa is not None and wb is not None:
            settings = make_settings(Options(tol, max_iters, seed, device.value, dtype.value, method.value,
                                             certify.value, failure_probability))
            with progress_bar(progress and sys.stderr.isatty()) as callback:
                result["updates"] = update_norms(wa, wb, settings, callback)  # type: ignore[arg-type]
    doc = json_safe(result)
    if format is OutputFormat.table:
        from .render import diff_table

        _emit(None, diff_table(doc), output, [a, b])
        return EXIT_OK
    text = writers.write(format.value, "diff", doc)
    if format is OutputFormat.markdown:
        text = _markdown_with_charts(text, "diff", [doc], output, [a, b])
    _emit(text, None, output, [a, b])
    return EXIT_OK


@app.command(cls=Command)
def schema() -> int:
    """Print the JSON Schema of lipcheck's JSON reports."""
    from importlib.resources import files

    sys.stdout.write(files("lipcheck").joinpath("schema.json").read_text(encoding="utf-8"))
    return EXIT_OK


class Mode(str, enum.Enum):
    bake = "bake"
    parametrize = "parametrize"


@app.command(cls=Command)
def normalize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="Where to write the normalized model (same format as the input).", show_default=False)],
    target: Annotated[float | None, typer.Option("--target", metavar="T", help="Spectral norm each selected layer gets (default 1.0; with --budget, at most this).")] = None,
    clip: Annotated[bool, typer.Option("--clip", help="Only rescale layers above the target; the others stay bit-identical.")] = False,
    budget: Annotated[float | None, typer.Option("--budget", metavar="L", help="Pick one per-layer target so the network bound is at most this.")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="bake: rescale the weights themselves and write the same format as the input. parametrize (a pickled module with --trust, or an ONNX model onnx2torch converts): register torch's parametrizations.spectral_norm, then a fixed lipcheck.parametrize.Scale, on the weight of each rescaled Linear/Conv, and write torch.save({format, layers, state_dict}): the weights and which modules carry the parametrizations, not a pickled module. lipcheck.parametrize.load(model, FILE) puts them into a fresh instance of the same architecture.")] = Mode.bake,
    layers: Annotated[list[str] | None, typer.Option("--layers", metavar="GLOB", help="Only layers whose name matches this glob (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Skip layers whose name matches this glob (repeatable).")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow the output to be the input file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    report: Annotated[Path | None, typer.Option("--report", metavar="FILE", help="Write the before/after comparison as JSON.")] = None,
    input_shape: InputShapeOpt = None,
    tol: TolOpt = DEFAULTS.tol,
    max_iters: MaxItersOpt = DEFAULTS.max_iters,
    seed: SeedOpt = DEFAULTS.seed,
    device: DeviceOpt = Device(DEFAULTS.device),
    dtype: DTypeOpt = DType(DEFAULTS.dtype),
    method: MethodOpt = Method(DEFAULTS.method),
    certify: CertifyOpt = Certify(DEFAULTS.certify),
    failure_probability: FailureProbOpt = DEFAULTS.failure_probability,
    trust: TrustOpt = False,
    progress: ProgressOpt = True,
    architecture: ArchOpt = None,
) -> int:
    """Rewrite a model with spectrally normalized layers, then re-inspect it to prove it."""
    shape = parse_shape(input_shape)
    _check_inputs(model)
    _check_positive(target=target, budget=budget)
    _check_architecture(architecture)
    from .files import check_output_path

    check_output_path(model, output, in_place=in_place, force=force)
    if report is not None:
        check_report_path(report, model, output)
        _check_report_path(report, [model])
    options = Options(tol, max_iters, seed, device.value, dtype.value, method.value, certify.value,
                      failure_probability)  # checked before torch loads
    from .normalization import normalize as run_normalize
    from .pipeline import make_settings
    from .render import make_console, normalize_summary, normalize_table, progress_bar

    settings = make_settings(options)
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
FLAGS = {"architecture": "--model", "start": "--from"}


# Commands that share their work out between processes under torchrun (lipcheck.distributed).
SPREAD_COMMANDS = ("inspect", "check")


def _follower() -> bool:
    """A process other than rank 0 of a torchrun launch: it prints nothing but exits alike."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1") and os.environ.get("RANK", "0") not in ("", "0")


def _alone(argv: list[str]) -> None:
    """Under torchrun, commands that write files or compare (normalize, diff) would run once per
    process, racing on their outputs: refused, with the command that works."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command in app_commands() and command not in SPREAD_COMMANDS:
        raise UsageError(f"lipcheck {command} does not share its work between processes: run it "
                         f"without torchrun (only {' and '.join(SPREAD_COMMANDS)} do)")


def app_commands() -> set[str]:
    return {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every known error becomes one stderr line (on rank 0
    alone under torchrun)."""
    if _follower():
        # The same arguments and files reach every process: a bad one (exit 2) is reported by
        # rank 0, and a follower exiting non-zero first would make the launcher stop rank 0
        # before it says why. A bug (exit 3) still fails the follower.
        with contextlib.redirect_stderr(io.StringIO()):
            code = _run(argv)
        return EXIT_OK if code == UsageError.exit_code else code
    return _run(argv)


def _run(argv: list[str] | None = None) -> int:
    try:
        _alone(sys.argv[1:] if argv is None else argv)
        result = app(args=argv, prog_name="lipcheck", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("lipcheck: aborted", file=sys.stderr)
        return 130
    except click_exceptions.NoArgsIsHelpError as exc:
        # Bare `lipcheck`: the whole help, as --help shows it, but as click answers a command
        # line without a command: on stderr, exit 2 (stdout stays for data).
        sys.stderr.write(exc.format_message().rstrip("\n") + "\n")
        return UsageError.exit_code
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
