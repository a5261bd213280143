"""Several processes on one checkpoint: ``torchrun --nproc-per-node N -m lipcheck inspect <folder>``.

Under a launcher that sets ``WORLD_SIZE`` > 1 (torchrun, or any ``env://`` launcher with
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), the tensors of a weight-only input
(a model folder, its shards, a safetensors file, a state_dict) are shared out between the
processes: each process reads and analyses only its share (largest tensors first, each onto
the process with the least work so far, sizes taken from the files' headers, so every process
computes the same assignment without talking), then every process receives every row and
process 0 (rank 0) writes the report. The report is the one a single process writes: the same
rows in the same order with the same numbers, because every start vector is seeded from
``--seed`` alone, never from the rank or from the order tensors are visited in.

Rows travel between processes as Python objects through a gloo process group (a few kB per
matrix: never the bottleneck), also when the estimates run on GPUs; each process then computes
on ``cuda:LOCAL_RANK``. An error on any process (a truncated shard only it reads) reaches every
process: all exit with that error's code, and rank 0 alone prints the line. The launcher then
reports the failed processes in its own words, with its own exit code. A collective that waits
longer than ``LIPCHECK_DIST_TIMEOUT`` seconds (default 7200) ends the run instead of hanging.

A model with a graph (ONNX, a module) is not split: rank 0 analyses it alone, the other
processes wait for it, and the report says so in a note.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from . import errors
from .errors import LipcheckError, UsageError

DEFAULT_TIMEOUT_S = 7200
GRAPH_NOTE = ("not split across processes: a model with a graph is analysed by rank 0 alone "
              "(only weight-only checkpoints are shared out)")


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones."""

    rank: int
    size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def world_from_env(environ: Mapping[str, str] | None = None) -> World | None:
    """The launch this process is part of, or None when it runs alone (no ``WORLD_SIZE`` or 1)."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1") or "1")
        if size <= 1:
            return None
        rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0") or "0")
    except (KeyError, ValueError):
        raise UsageError("WORLD_SIZE > 1 but RANK is missing or not a number: start several processes "
                         "with torchrun (or set WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT)") from None
    if not (0 <= rank < size):
        raise UsageError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank, size, local)


def assign(sizes: list[int], ranks: int) -> list[int]:
    """The rank that handles each item: largest first, each onto the rank with the least work
    so far (ties to the lowest rank). Deterministic: every process computes the same list."""
    owner = [0] * len(sizes)
    load = [0] * ranks
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += max(sizes[i], 1)
    return owner


def _timeout() -> timedelta:
    raw = os.environ.get("LIPCHECK_DIST_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"LIPCHECK_DIST_TIMEOUT must be a number of seconds, got '{raw}'") from None
    if not seconds > 0:
        raise UsageError(f"LIPCHECK_DIST_TIMEOUT must be positive, got '{raw}'")
    return timedelta(seconds=seconds)


@contextmanager
def process_group(world: World) -> Iterator[None]:
    """Joins the launch's process group for the duration (and leaves it cleanly)."""
    import torch
    import torch.distributed as dist

    timeout = _timeout()
    if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)  # "cuda" then means this process's own GPU
    try:
        dist.init_process_group("gloo", init_method="env://", rank=world.rank, world_size=world.size,
                                timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a launch that cannot meet is the user's setup
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"could not join the other processes (rank {world.rank} of {world.size}): {first}") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Failure:
    """An error on one rank, in a form every rank can raise again."""

    rank: int
    kind: str  # the LipcheckError subclass's name, or "internal"
    template: str
    param: str | None
    exit_code: int

    @staticmethod
    def of(rank: int, exc: BaseException) -> Failure:
        if isinstance(exc, LipcheckError):
            return Failure(rank, type(exc).__name__, exc.template, exc.param, exc.exit_code)
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        return Failure(rank, "internal", f"{type(exc).__name__}: {first}", None, errors.EXIT_INTERNAL)

    def error(self) -> BaseException:
        if self.kind == "internal":
            return RuntimeError(f"on rank {self.rank}: {self.template}")
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, LipcheckError)):
            cls = LipcheckError
        exc = cls(self.template, param=self.param)
        exc.exit_code = self.exit_code
        return exc


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


class Spread:
    """Shares the tensors of one input out between the processes of ``world`` (see the module
    docstring); called by :func:`lipcheck.rules.tensors.tensor_rows`."""

    def __init__(self, world: World) -> None:
        self.world = world

    @property
    def leader(self) -> bool:
        return self.world.leader

    def __call__(self, keys: list[str], work: Callable[[str], Any], tensors: Mapping[str, Any]) -> list[Any]:
        from .formats.checkpoint_folder import shape_of

        owner = assign([_numel(shape_of(tensors, key)) for key in keys], self.world.size)
        mine: dict[int, Any] = {}
        failure: Failure | None = None
        for i, key in enumerate(keys):
            if owner[i] != self.world.rank:
                continue
            try:
                mine[i] = work(key)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they wait
                failure = Failure.of(self.world.rank, exc)
                break
        parts = exchange(self.world, "rows", (mine, failure))
        failures = [f for _, f in parts if f is not None]
        if failures:
            raise failures[0].error()  # the lowest rank's: the same error on every process
        results: dict[int, Any] = {}
        for part, _ in parts:
            results.update(part)
        if len(results) != len(keys):
            raise RuntimeError(f"the processes returned {len(results)} of {len(keys)} tensors' rows")
        return [results[i] for i in range(len(keys))]


class NotMine(Exception):
    """Raised on ranks other than 0 for a model that is not split (one with a graph)."""


def exchange(world: World, step: str, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process. ``step`` names the point of
    the run the processes meet at: processes that meet at different points fell out of step
    (one failed before a step the others reached), and that ends the run."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, (step, obj))
    steps = {s for s, _ in gathered}
    if steps != {step}:
        raise RuntimeError(f"the processes fell out of step (at {', '.join(sorted(steps))}); "
                           "see the other ranks' errors")
    return [o for _, o in gathered]


def settle(world: World, failure: BaseException | None) -> None:
    """Ends a command on every process alike: when any rank failed, every rank raises the lowest
    failing rank's error (rank 0 prints it; the others exit with its code, silently)."""
    statuses = exchange(world, "end", None if failure is None else Failure.of(world.rank, failure))
    failures = [f for f in statuses if f is not None]
    if failures:
        first = failures[0]
        if first.rank == world.rank and failure is not None:
            raise failure
        raise first.error()
