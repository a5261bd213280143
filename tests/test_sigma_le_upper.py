"""Every row of every test model: the estimate (a lower bound) never exceeds the
certificate (an upper bound)."""

from __future__ import annotations

from pathlib import Path

import pytest

import lipcheck
from lipcheck import testing
from lipcheck.pipeline import _estimates_within_certificates
from lipcheck.report import LayerRow

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _check(report: lipcheck.Report) -> None:
    for row in report.layers:
        if row.sigma is not None and row.sigma_upper is not None:
            assert row.sigma <= row.sigma_upper, (row.name, row.sigma, row.sigma_upper)


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.onnx")) +
                         sorted(p.name for p in SAMPLES.glob("*.state_dict.pt")))
def test_samples(sample: str) -> None:
    _check(lipcheck.analyze(SAMPLES / sample))


@pytest.mark.parametrize("name", sorted(testing.BUILDERS))
def test_builders(name: str) -> None:
    module, shape = testing.BUILDERS[name](0)
    _check(lipcheck.analyze(module, shape))


def test_conv_layer_cases() -> None:
    for _, module, shape in testing.conv_layer_cases(0):
        _check(lipcheck.analyze(module, shape))


def test_an_estimate_above_its_certificate_is_lowered_and_said() -> None:
    row = LayerRow(name="c", op="Conv", kind="conv", sigma=1.00001, sigma_upper=1.0)
    _estimates_within_certificates([row])
    assert row.sigma == 1.0 and "above the certificate" in (row.note or "")
