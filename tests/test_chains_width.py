"""Chains wider than chains.MAX_WIDTH keep the product (ECLipsE-Fast costs width³ per layer),
and the chain's last row says so."""

from __future__ import annotations

from pathlib import Path

import pytest

import lipcheck
from lipcheck import chains

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_wide_chain_keeps_the_product(monkeypatch: pytest.MonkeyPatch) -> None:
    narrow = lipcheck.analyze(SAMPLES / "mlp.onnx")
    assert narrow.network.composition in ("eclipse", "eclipse-fast")
    monkeypatch.setattr(chains, "MAX_WIDTH", 8)  # the sample's layers are 32 wide
    wide = lipcheck.analyze(SAMPLES / "mlp.onnx")
    assert wide.network.composition == "graph-product"
    product = 1.0
    for row in wide.layers:
        product *= row.lipschitz if row.lipschitz is not None else 1.0
    assert wide.network.lipschitz_bound == pytest.approx(product, rel=1e-12)
    assert wide.network.lipschitz_bound > narrow.network.lipschitz_bound
    notes = [r.note for r in wide.layers if r.note and "ECLipsE not tried" in r.note]
    assert len(notes) == 1 and "> 8" in notes[0] and "the bound uses the product" in notes[0]
