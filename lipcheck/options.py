"""The analysis settings a user chooses, their defaults written once, and their checks.

Plain data (no torch import), so the command line can declare its defaults from here
without paying for torch. :func:`lipcheck.pipeline.make_settings` turns options into the
numerics' ``spectral.Settings``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import UsageError

METHODS = ("lanczos", "power")
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")
CERTIFY = ("auto", "exact", "probabilistic")


@dataclass(frozen=True)
class Options:
    """How estimates are computed. ``tol``: relative accuracy an estimate stops at;
    ``max_iters``: the most steps it takes; ``seed``: of the start vectors; ``device``:
    auto, cpu or cuda; ``dtype``: of the estimates (certificates are always float64);
    ``method``: lanczos or power; ``certify``: how dense matrices get their upper bound
    (exact: deterministic certificates; probabilistic: a random-start Krylov bound failing
    with probability at most ``failure_probability`` per layer; auto: exact where cheap)."""

    tol: float = 1e-6
    max_iters: int = 1000
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    method: str = "lanczos"
    certify: str = "auto"
    failure_probability: float = 1e-9

    def __post_init__(self) -> None:
        # Refused here, in the library's words; the CLI shows the flag (``--tol``).
        if not (0 < self.tol < 1):
            raise UsageError(f"{{param}} must be between 0 and 1 (exclusive), got {self.tol}", param="tol")
        if self.max_iters < 1:
            raise UsageError(f"{{param}} must be at least 1, got {self.max_iters}", param="max_iters")
        if not (0 < self.failure_probability < 1):
            raise UsageError(f"{{param}} must be between 0 and 1 (exclusive), got {self.failure_probability}",
                             param="failure_probability")
        for name, allowed in (("dtype", DTYPES), ("method", METHODS), ("device", DEVICES), ("certify", CERTIFY)):
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"{{param}} must be one of {', '.join(allowed)}, got {value}", param=name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = Options()
