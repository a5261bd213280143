"""Atomic file writes, shared by every command that writes (reports, rewritten models)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError


def atomic_write(output: Path, data: bytes) -> None:
    """Write a sibling temp file, then os.replace it over ``output``: readers see the old
    file or the new one, never half of one, and a failure leaves no temp file behind.
    os.replace swaps a symlink at ``output`` itself rather than writing through it."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {output}: folder {folder} does not exist")
    tmp = folder / f".{output.name}.lipcheck-tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
        os.replace(tmp, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
