"""Row kinds: one enum, the schema's list, and what reaches JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lipcheck
from lipcheck.ops import GATED_KINDS
from lipcheck.report import LayerRow, RowKind


def test_schema_lists_exactly_the_row_kinds() -> None:
    schema = json.loads((Path(lipcheck.__file__).parent / "schema.json").read_text())
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            kind = node.get("properties", {}).get("kind") if isinstance(node.get("properties"), dict) else None
            if isinstance(kind, dict) and "enum" in kind:
                found.append(set(kind["enum"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert {k.value for k in RowKind} in found


def test_unknown_kind_is_refused_at_the_door() -> None:
    with pytest.raises(ValueError):
        LayerRow(name="x", op="Gemm", kind="lineer")  # type: ignore[arg-type]


def test_string_kind_becomes_the_enum_and_serialises_as_its_value() -> None:
    row = LayerRow(name="x", op="Gemm", kind="conv")  # type: ignore[arg-type]
    assert row.kind is RowKind.CONV
    assert json.dumps({"kind": row.kind}) == '{"kind": "conv"}'
    assert str(row.kind) == "conv"


def test_gated_kinds_are_row_kinds() -> None:
    assert GATED_KINDS <= set(RowKind)
    assert "linear" in GATED_KINDS  # the gate reads plain strings from JSON documents
