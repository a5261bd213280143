"""The list of cases, how each is written, and what lipcheck must answer."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .forge import MARKER_NAME


@dataclass(frozen=True)
class Case:
    name: str  # file name in the corpus folder (its extension is often a lie)
    kind: str  # untrusted | broken | unsupported | ok
    fragment: str  # expected in the error line (exit 2), or in the JSON report (exit 0)
    build: Callable[[Path, Path], Path | None]  # (path, marker) -> writes it; may return another path
    args: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 0 if self.kind == "ok" else 2


CASES: list[Case] = []


def case(name: str, kind: str, fragment: str, args: tuple[str, ...] = ()) -> Callable:  # type: ignore[type-arg]
    def register(fn: Callable[[Path, Path], Path | None]) -> Callable[[Path, Path], Path | None]:
        CASES.append(Case(name, kind, fragment, fn, args))
        return fn

    return register


def build_case(folder: Path, c: Case) -> Path:
    """Write one case into ``folder``; returns the path to hand to lipcheck."""
    path = folder / c.name
    other = c.build(path, folder / MARKER_NAME)
    return other if isinstance(other, Path) else path


def build_corpus(folder: Path) -> dict[str, Path]:
    """Write every case into ``folder`` (which should be empty); {case name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    return {c.name: build_case(folder, c) for c in CASES}


def listing(folder: Path) -> set[str]:
    """Every path under ``folder`` (relative), symlinks not followed."""
    out = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            out.add(str(Path(root, name).relative_to(folder)))
    return out
