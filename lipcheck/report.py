"""The report: one record per layer, the network bound, what was skipped; JSON and CSV.

This module is plain data and serialisation; it imports neither torch nor rich.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = "1"


class RowKind(StrEnum):
    """What a row is: its ``kind`` in every report (the schema lists the same values)."""

    LINEAR = "linear"          # Gemm, MatMul, Linear: a matrix
    CONV = "conv"              # a convolution on its real input size
    DIAGONAL = "diagonal"      # BatchNorm, per-channel scales
    ACTIVATION = "activation"  # elementwise functions
    POOL = "pool"              # pooling
    COMBINE = "combine"        # Add, Concat, ...: how branches meet
    RECURRENT = "recurrent"    # LSTM, GRU, RNN weights
    NORMALIZATION = "normalization"  # LayerNorm, RMSNorm, GroupNorm, InstanceNorm
    EMBEDDING = "embedding"    # a lookup table: reported, not part of a Lipschitz chain
    HEAD = "head"              # one attention head's block of a q/k/v/o matrix (--per-head)
    PRODUCT = "product"        # Mul / Div / MatMul of two activations: local on an input domain


@dataclass
class LayerRow:
    """One analysed op.

    sigma        Lanczos (or power-iteration) estimate of the op's spectral norm (a lower bound)
    sigma_matrix for convolutions: sigma of the weight reshaped to (out, -1), the
                 number torch.nn.utils.spectral_norm divides by (not a Lipschitz constant)
    sigma_upper  certified upper bound on the op's constant, obtained by upper_method
    lipschitz    the constant the network bound uses for this op (certified)
    bound        certified bound from the network input to this op's output
    spectral_norm which torch spectral normalization the stored weight carries, if any
                 (the row then describes the effective weight W_orig / u.W_orig v)
    rms_to_rms   sigma * sqrt(fan_in / fan_out): the matrix's norm from RMS to RMS (the
                 spectral condition of Yang, Simon & Bernstein 2023), for weights without a graph
    stable_rank  ||W||_F^2 / sigma^2
    block, role  for transformer checkpoints: the block index and what the matrix is
                 (q, k, v, o, qkv, gate, up, down, gate_up, router, embed, lm_head)
    upper_kind   "certified" (sigma_upper holds whatever the spectrum) or "probabilistic"
                 (it holds except with probability at most failure_probability, over the
                 random start of the Krylov run); null when there is no upper bound
    failure_probability  for a probabilistic upper bound: the probability it fails
    """

    name: str
    op: str
    kind: RowKind
    input_shape: list[int | None] | None = None
    sigma: float | None = None
    sigma_matrix: float | None = None
    sigma_upper: float | None = None
    upper_method: str | None = None
    lipschitz: float | None = None
    iterations: int | None = None
    converged: bool | None = None
    bound: float | None = None
    note: str | None = None
    spectral_norm: str | None = None
    rms_to_rms: float | None = None
    stable_rank: float | None = None
    block: int | None = None
    role: str | None = None
    upper_kind: str | None = None
    failure_probability: float | None = None

    def __post_init__(self) -> None:
        self.kind = RowKind(self.kind)  # an unknown kind is a bug: fail here, not in a reader


@dataclass
class SkippedOp:
    name: str
    op: str
    reason: str


@dataclass
class NetworkResult:
    """The whole network's constant.

    lipschitz_bound     upper bound on the network's Lipschitz constant (null: unbounded)
    lipschitz_estimate  the same composition of the per-op estimates (not a bound)
    certified           the bound holds deterministically; false with a probabilistic bound
                        or none
    composition         how the bound was composed from the per-op constants
    failure_probability for a bound built on probabilistic per-op bounds: at most the sum of
                        theirs (null: deterministic)
    lipschitz_lower     a true lower bound: the norm of a Jacobian found at a real input
    domain              the input domain a local bound holds on (null: global)
    start               the value the bound starts at (--from; null: the network input), all
                        that is not computed from it held fixed
    """

    lipschitz_bound: float | None
    lipschitz_estimate: float | None
    bounded: bool
    certified: bool
    reason: str
    composition: str | None = None
    failure_probability: float | None = None
    lipschitz_lower: float | None = None
    domain: str | None = None
    start: str | None = None


@dataclass
class ModelInfo:
    path: str
    sha256: str
    format: str
    input_shape: list[int] | None = None


@dataclass
class Report:
    model: ModelInfo
    settings: dict[str, Any]
    layers: list[LayerRow]
    network: NetworkResult
    skipped: list[SkippedOp] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # with --per-head: bounds on each head's attention logits (lipcheck.heads.LogitBound);
    # in the JSON only when there are some
    logit_bounds: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        doc = {
            "schema_version": SCHEMA_VERSION,
            "lipcheck_version": __version__,
            "model": asdict(self.model),
            "settings": dict(self.settings),
            "layers": [asdict(r) for r in self.layers],
            "network": asdict(self.network),
            "skipped": [asdict(s) for s in self.skipped],
            "notes": list(self.notes),
        }
        if self.logit_bounds:
            doc["logit_bounds"] = [asdict(b) for b in self.logit_bounds]
        return json_safe(doc)


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity: non-finite floats become null (the row's note
    or the network reason says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


LAYER_FIELDS = [f.name for f in fields(LayerRow)]
