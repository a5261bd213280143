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


def check_output_path(source: Path, output: Path, *, in_place: bool, force: bool) -> None:
    """Where ``normalize`` may write ``output`` from ``source``: never over the input unless
    ``in_place``, never over another file unless ``force``, never into a missing folder. A model
    folder (or its ``.index.json``) goes to a new folder. No torch here: the CLI calls this before
    loading it, and ``lipcheck.normalization`` calls it again."""
    if source.is_dir() or source.name.endswith(".index.json"):
        check_folder_output(source, output, force=force)
        return
    same = output.exists() and source.exists() and os.path.samefile(source, output)
    if same and not in_place:
        raise UsageError(f"refusing to overwrite the input {source}; pass --in-place to do that")
    if output.exists() and not same and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    if output.is_dir():
        raise UsageError(f"{output} is a directory")
    require_parent_folder(output)


def require_parent_folder(output: Path) -> None:
    """The folder a file is to be written into exists."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {output}: folder {folder} does not exist")


def check_folder_output(source: Path, output: Path, *, force: bool) -> None:
    """A model folder is written to a new folder (written beside it under a temp name and
    renamed at the end); never into or over the input, never over a file."""
    folder = (source if source.is_dir() else source.parent).resolve()
    target = output.resolve()
    if target == folder or folder in target.parents or target in folder.parents:
        raise UsageError(f"refusing to write the model folder {source} into itself or over a folder "
                         f"holding it ({output}); give a new folder")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder; a model folder is written to a folder")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {output}: folder {parent} does not exist")
