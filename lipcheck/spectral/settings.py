"""The numerical settings of one run, and the choice of device.

The user-facing defaults and their checks live in :mod:`lipcheck.options`; this is the
record the numerics receive (a torch dtype, a resolved device).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

METHODS = ("lanczos", "power")
# How dense matrices get their upper bound: "exact" a deterministic certificate (Gram +
# Cholesky, O(n^3)); "probabilistic" a Krylov bound that fails with probability at most
# failure_probability per layer (O(k n^2)); "auto" the deterministic one where it is cheap.
CERTIFY_MODES = ("auto", "exact", "probabilistic")


@dataclass(frozen=True)
class Settings:
    """Numerical settings shared by every estimate of one run."""

    tol: float = 1e-6
    max_iters: int = 1000
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    method: str = "lanczos"  # or "power", the plain reference method
    certify: str = "auto"  # one of CERTIFY_MODES
    failure_probability: float = 1e-9  # per probabilistic layer bound

    def __post_init__(self) -> None:
        if not (0 < self.tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.certify not in CERTIFY_MODES:
            raise ValueError(f"certify must be one of {', '.join(CERTIFY_MODES)}, got {self.certify!r}")
        if not (0 < self.failure_probability < 1):
            raise ValueError(f"failure_probability must be in (0, 1), got {self.failure_probability}")


def resolve_device(name: str) -> str:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return name


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed (small) LAPACK calls on one thread, then restore the thread count.

    The eigen-solves of projected Krylov matrices (at most a few hundred rows) gain little
    from a second thread on an idle machine, and lose badly on a loaded one: with one core
    taken by another process, a two-thread ``eigh`` of a 320x320 matrix was measured at
    1.27 s against 8 ms on one thread (benchmarks/RESULTS.md, issue 12). One thread also
    makes their rounding independent of the machine's core count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
