"""Atomic file writes, shared by every command that writes (reports, rewritten models)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError


def atomic_write(output: Path, data: bytes) -> None:
    """Write a sibling temp file, then os.replace it over ``output``: readers see the old
    file or the new one, never half of one, and a failure leaves no temp file behind.
    os.replace swaps a symlink at ``output`` itself rather than writing through it."""
    with atomic_writer(output) as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_writer(output: Path) -> Iterator[BinaryIO]:
    """:func:`atomic_write` for data written piece by piece (a file too large to hold in
    memory): the file appears at ``output`` only when the block ends without an error."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {output}: folder {folder} does not exist")
    # mkstemp creates the file with O_EXCL: a name planted in advance (a symlink to
    # somewhere else) makes it pick another name instead of writing through it.
    try:
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".lipcheck-tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _umask() -> int:
    """The process umask (mkstemp creates files 0600; a report should get the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
