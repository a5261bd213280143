"""Spectral norms: Lanczos (or power-iteration) estimates and certified upper bounds.

Everything here is pure numerics on torch tensors: no printing, no I/O.

Two kinds of number come out of this package and must never be confused:

* an **estimate** (``Estimate.sigma``, :mod:`.estimate`) from thick-restart Lanczos, or
  plain power iteration with ``method="power"``. Both return the norm of the operator
  applied to a unit vector, so the estimate is a *lower* bound on the largest singular
  value, and only close to it once converged;
* a **certificate** (``Certificate.value``, :mod:`.certify`), an upper bound that holds
  whatever the spectrum looks like (Cholesky-verified candidates, circular-convolution
  FFT, Schur test), or, for dense matrices with ``certify`` "probabilistic" (or "auto" on
  large ones), a probabilistic upper bound from a random-start Krylov run that fails with
  probability at most ``failure_probability`` (``dense_bound`` says which kind it gave).

:mod:`.maps` holds the linear maps both work on (convolutions, paddings) and
:mod:`.settings` the numerical settings of a run. The names below are the package's
interface; the tuning constants of the loops stay in their modules.
"""

from __future__ import annotations

from .certify import (
    CERT_GAP,
    CERT_SAFETY,
    Certificate,
    DenseBound,
    SigmaMaxBound,
    conv_explicit_bounds,
    conv_fft_upper_bound,
    conv_reshape_upper_bound,
    dense_bound,
    gram_upper_bound,
    krylov_upper_bound,
    lanczos_epsilon,
    lanczos_failure_probability,
    polyphase_kernel,
    schur_upper_bound,
    strided_conv_upper_bound,
)
from .estimate import Estimate, conv_estimate, matrix_estimate, operator_estimate, start_vector
from .maps import LinearMap, Shape, conv_forward, conv_group_matrices, matrix_batch, pad_forward, pad_multiplicity
from .settings import CERTIFY_MODES, METHODS, Settings, resolve_device

__all__ = [
    "CERT_GAP",
    "CERT_SAFETY",
    "CERTIFY_MODES",
    "METHODS",
    "Certificate",
    "DenseBound",
    "Estimate",
    "LinearMap",
    "Settings",
    "Shape",
    "SigmaMaxBound",
    "conv_estimate",
    "conv_explicit_bounds",
    "conv_forward",
    "conv_group_matrices",
    "conv_fft_upper_bound",
    "conv_reshape_upper_bound",
    "dense_bound",
    "gram_upper_bound",
    "krylov_upper_bound",
    "lanczos_epsilon",
    "lanczos_failure_probability",
    "matrix_batch",
    "matrix_estimate",
    "operator_estimate",
    "pad_forward",
    "pad_multiplicity",
    "polyphase_kernel",
    "resolve_device",
    "schur_upper_bound",
    "start_vector",
    "strided_conv_upper_bound",
]
