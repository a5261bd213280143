"""lipcheck: per-layer spectral norms and a certified Lipschitz bound for neural networks.

The heavy parts (torch, onnx) load on first use, so importing the package and
``lipcheck --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "analyze", "normalize", "Report"]

if TYPE_CHECKING:
    from .api import analyze, normalize
    from .report import Report


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from .api import analyze

        return analyze
    if name == "normalize":
        from .api import normalize

        return normalize
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(f"module 'lipcheck' has no attribute {name!r}")
