"""``torchrun -m lipcheck inspect <folder>``: two real processes share the tensors out and rank 0
writes the report a single process writes; an error on either rank ends both with one line."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import llama_tensors
from safetensors.torch import save_file

from lipcheck.distributed import World, assign, world_from_env
from lipcheck.errors import UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
D, F, V, E = 32, 48, 40, 4


def _folder(path: Path) -> Path:
    """A seeded Llama-shaped folder in three shards: attention and MLP matrices, fused experts,
    an embedding, norms, with config.json's head counts."""
    t = llama_tensors(0, torch.float32, D, F, V)
    g = torch.Generator().manual_seed(0)
    t["model.layers.1.mlp.experts.down_proj"] = torch.randn(E, D, 12, generator=g)
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}
    path.mkdir()
    keys = sorted(t)
    weight_map = {}
    for i in range(3):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        part = keys[i::3]
        save_file({k: t[k].contiguous() for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "hidden_size": D}))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("dist") / "llama")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", LIPCHECK_DIST_TIMEOUT="120")
    return env


def _torchrun(target: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_port()), *target]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)


def _alone(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lipcheck", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=240)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lipcheck: ")]


# --- the assignment and the environment (no processes) ---

def test_assignment_balances_largest_first_and_is_deterministic() -> None:
    sizes = [100, 1, 60, 50, 3, 40]
    owner = assign(sizes, 2)
    assert owner == assign(list(sizes), 2)
    # by hand: 100 -> 0; 60 -> 1; 50 -> 1 (60 < 100); 40 -> 0 (100 < 110); 3 -> 1; 1 -> 1
    assert owner == [0, 1, 1, 1, 1, 0]
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert max(load) - min(load) <= max(sizes)
    assert set(assign([5] * 7, 3)) == {0, 1, 2}
    assert assign([], 4) == []


def test_world_from_the_environment() -> None:
    assert world_from_env({}) is None
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    for bad in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "x"}, {"WORLD_SIZE": "2", "RANK": "2"}):
        with pytest.raises(UsageError):
            world_from_env(bad)


# --- two real processes ---

@pytest.mark.e2e
def test_two_processes_write_the_single_process_report(folder: Path, tmp_path: Path) -> None:
    one = _alone(["inspect", str(folder), "--per-head", "--format", "json", "-o", "one.json"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(["-m", "lipcheck", "inspect", str(folder), "--per-head", "--format", "json",
                     "-o", "two.json"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == "" and not _errors(two.stderr)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a == b  # every field: rows in the same order, the same numbers, notes, skipped
    # and the numbers are the stored matrices' exact norms (float64 SVD of the bf16 values)
    from safetensors.torch import load_file

    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(str(shard)))
    rows = {r["name"]: r for r in b["layers"]}
    checked = 0
    for key, w in stored.items():
        mats = [(f"{key}[{e}]", w[e]) for e in range(w.shape[0])] if w.ndim == 3 else (
            [(key.removesuffix(".weight"), w)] if w.ndim == 2 else [])
        for name, m in mats:
            exact = float(torch.linalg.matrix_norm(m.double(), 2))
            assert rows[name]["sigma"] <= exact * (1 + 1e-6) and rows[name]["sigma_upper"] >= exact * (1 - 1e-12)
            assert rows[name]["sigma"] == pytest.approx(exact, rel=1e-5)
            checked += 1
    assert checked == 2 * 7 + 2 + E


@pytest.mark.e2e
def test_an_error_on_one_rank_ends_both_with_one_line(folder: Path, tmp_path: Path) -> None:
    """Rank 1 alone fails on the tensor it reads (a damaged read, simulated in the launched
    script): both processes stop with exit 2, rank 0 prints the one line, nothing is written."""
    script = tmp_path / "run_lipcheck.py"
    script.write_text(
        "import os, sys\n"
        "from lipcheck.errors import InputError\n"
        "import lipcheck.rules.tensors as t\n"
        "real = t._key_rows\n"
        "def damaged(tensors, key, *args):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise InputError(f'{key}: damaged on rank 1')\n"
        "    return real(tensors, key, *args)\n"
        "t._key_rows = damaged\n"
        "from lipcheck.cli import run\n"
        "sys.exit(run(sys.argv[1:]))\n")
    out = tmp_path / "report.json"
    res = _torchrun([str(script), "inspect", str(folder), "--format", "json", "-o", str(out)], tmp_path)
    assert res.returncode != 0
    lines = _errors(res.stderr)
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("lipcheck: error: ") and "damaged on rank 1" in lines[0]
    # rank 0 carries the exit code (the launcher names it as the root cause); rank 1 ends quietly
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*2\b", res.stderr), res.stderr[-3000:]
    assert not out.exists()


@pytest.mark.e2e
def test_a_graph_model_is_analysed_by_rank_0_alone(tmp_path: Path) -> None:
    one = _alone(["inspect", str(SAMPLES / "mlp.onnx"), "--format", "json", "-o", "one.json"], tmp_path)
    two = _torchrun(["-m", "lipcheck", "inspect", str(SAMPLES / "mlp.onnx"), "--format", "json",
                     "-o", "two.json"], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["layers"] == b["layers"] and a["network"] == b["network"]
    assert [n for n in b["notes"] if n not in a["notes"]] == [
        "not split across processes: a model with a graph is analysed by rank 0 alone "
        "(only weight-only checkpoints are shared out)"]


@pytest.mark.e2e
def test_normalize_under_torchrun_is_refused(folder: Path, tmp_path: Path) -> None:
    res = _torchrun(["-m", "lipcheck", "normalize", str(folder), "-o", "out"], tmp_path)
    assert res.returncode != 0
    lines = _errors(res.stderr)
    assert len(lines) == 1 and "does not share its work between processes" in lines[0], res.stderr[-3000:]
    assert not (tmp_path / "out").exists()
