"""Mutated sample files: lipcheck answers 0 (a report) or 2 (one line), nothing else.

Hypothesis truncates the valid ``samples/mlp.state_dict.pt`` (a zip) and
``samples/mlp.onnx`` (protobuf) and flips or zeroes bytes in them; whatever comes out,
``lipcheck inspect`` must exit 0 with JSON on stdout, or 2 with a single
``lipcheck: error:`` line and empty stdout, never a traceback or an internal error.
Derandomized and bounded, so CI sees the same ~50 files every run. Inputs that once
failed are kept in ``REGRESSIONS`` and run every time.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from conftest import SAMPLES
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lipcheck.cli import run

TARGETS = {name: (SAMPLES / name).read_bytes() for name in ("mlp.state_dict.pt", "mlp.onnx")}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# (sample, truncate to, [(offset, byte)]) that once made lipcheck fail: kept as examples.
REGRESSIONS = [
    ("mlp.onnx", None, [(344, 0xE0)]),  # invalid UTF-8 in a node name: protobuf hands back bytes
    # "version needed to extract" 15.4 in the central directory: zipfile raises NotImplementedError
    ("mlp.state_dict.pt", None, [(TARGETS["mlp.state_dict.pt"].find(b"PK\x01\x02") + 6, 0x9A)]),
]


@st.composite
def mutations(draw: st.DrawFn, sample: str) -> tuple[int | None, list[tuple[int, int]]]:
    size = len(TARGETS[sample])
    cut = draw(st.one_of(st.none(), st.integers(0, size - 1)))
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=8))
    return cut, flips


def mutate(sample: str, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(TARGETS[sample])
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    return bytes(data[:cut] if cut is not None else data)


def check(sample: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / sample
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(["inspect", str(path), "-f", "json", "--device", "cpu", "--max-iters", "200"])
        stdout, stderr = out.getvalue(), err.getvalue()
        assert code in (0, 2), stderr
        if code == 0:
            json.loads(stdout)
        else:
            assert stdout == ""
            assert stderr.count("\n") == 1 and stderr.startswith("lipcheck: error: "), stderr
        assert sorted(p.name for p in Path(folder).iterdir()) == [sample], "lipcheck wrote a file"


@pytest.mark.parametrize("sample, cut, flips", REGRESSIONS)
def test_regressions(sample: str, cut: int | None, flips: list[tuple[int, int]]) -> None:
    check(sample, mutate(sample, cut, flips))


@FUZZ
@given(mutation=mutations("mlp.state_dict.pt"))
@example(mutation=(None, []))  # the untouched file analyses
@example(mutation=(len(TARGETS["mlp.state_dict.pt"]) // 2, []))
def test_mutated_state_dict(mutation: tuple[int | None, list[tuple[int, int]]]) -> None:
    check("mlp.state_dict.pt", mutate("mlp.state_dict.pt", *mutation))


@FUZZ
@given(mutation=mutations("mlp.onnx"))
@example(mutation=(None, []))
@example(mutation=(len(TARGETS["mlp.onnx"]) // 2, []))
def test_mutated_onnx(mutation: tuple[int | None, list[tuple[int, int]]]) -> None:
    check("mlp.onnx", mutate("mlp.onnx", *mutation))
