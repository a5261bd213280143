"""Transformer checkpoints as Hugging Face folders: shards and their index, bf16 weights,
fused experts, GPT-2 and BERT names. Every matrix is checked against float64
``matrix_norm(ord=2)`` of the stored values; bad folders are one-line errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import llama_tensors
from safetensors.torch import save_file

import lipcheck
from lipcheck.cli import run
from lipcheck.names import parse

D, F, V = 32, 48, 40


def _save_folder(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 2,
                 config: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * per:(i + 1) * per]
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return folder


def _llama(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    return llama_tensors(seed, dtype, D, F, V)


def _exact(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.double(), 2))


def test_llama_folder_every_matrix_exact(tmp_path: Path) -> None:
    tensors = _llama()
    folder = _save_folder(tmp_path / "llama", tensors)
    report = lipcheck.analyze(folder)
    rows = {r.name: r for r in report.layers}
    matrices = {k for k, v in tensors.items() if v.ndim == 2}
    assert set(rows) == {k[: -len(".weight")] for k in matrices}
    for key in matrices:
        row, w = rows[key[: -len(".weight")]], tensors[key].double()
        exact = _exact(w)
        assert row.sigma == pytest.approx(exact, rel=1e-6)
        assert exact <= row.sigma_upper * (1 + 1e-9)
        assert row.rms_to_rms == pytest.approx(row.sigma * math.sqrt(w.shape[1] / w.shape[0]), rel=1e-12)
        assert row.stable_rank == pytest.approx(float(w.norm()) ** 2 / row.sigma**2, rel=1e-9)
    assert rows["model.layers.1.mlp.down_proj"].block == 1 and rows["model.layers.1.mlp.down_proj"].role == "down"
    assert rows["model.embed_tokens"].kind == "embedding" and rows["lm_head"].role == "lm_head"
    assert not report.network.bounded
    # The index file itself, and the same weights in one file, give the same rows.
    same = lipcheck.analyze(folder / "model.safetensors.index.json")
    assert [(r.name, r.sigma) for r in same.layers] == [(r.name, r.sigma) for r in report.layers]


def test_fused_experts_are_one_row_per_expert(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    experts = torch.randn(4, F, D, generator=g)  # [E, out, in]
    experts[2] *= 3  # the largest, by construction
    tensors = {"model.layers.0.mlp.experts.down_proj": experts,
               "model.layers.0.mlp.gate.weight": torch.randn(4, D, generator=g),
               "model.layers.0.block_sparse_moe.experts.7.w1.weight": torch.randn(F, D, generator=g)}
    folder = _save_folder(tmp_path / "moe", tensors, shards=1)
    report = lipcheck.analyze(folder)
    rows = {r.name: r for r in report.layers}
    for e in range(4):
        row = rows[f"model.layers.0.mlp.experts.down_proj[{e}]"]
        assert row.sigma == pytest.approx(_exact(experts[e]), rel=1e-6)
        assert row.block == 0
    assert rows["model.layers.0.mlp.gate"].role == "router"
    assert rows["model.layers.0.block_sparse_moe.experts.7.w1"].role == "gate"
    summary = next(n for n in report.notes if "experts" in n and "down_proj" in n)
    assert "4 experts" in summary and "(expert 2)" in summary


def test_gpt2_conv1d_and_bert_names(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {"h.0.attn.c_attn.weight": torch.randn(D, 3 * D, generator=g),  # [in, out]
               "h.0.mlp.c_fc.weight": torch.randn(D, F, generator=g),
               "h.0.mlp.c_proj.weight": torch.randn(F, D, generator=g),
               "wte.weight": torch.randn(V, D, generator=g)}
    folder = _save_folder(tmp_path / "gpt2", tensors, shards=1, config={"model_type": "gpt2"})
    rows = {r.name: r for r in lipcheck.analyze(folder).layers}
    qkv = rows["h.0.attn.c_attn"]
    assert qkv.role == "qkv" and qkv.sigma == pytest.approx(_exact(tensors["h.0.attn.c_attn.weight"]), rel=1e-6)
    assert qkv.rms_to_rms == pytest.approx(qkv.sigma * math.sqrt(D / (3 * D)), rel=1e-12)  # fan_in = rows
    assert rows["h.0.mlp.c_proj"].role == "down" and rows["wte"].role == "embed"
    assert [parse(f"encoder.layer.3.{n}.weight").role for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense", "attention.output.LayerNorm")] == \
        ["q", "k", "v", "o", "up", "down", "norm"]


def test_single_file_and_bin_shards(tmp_path: Path) -> None:
    tensors = _llama(dtype=torch.float32)
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    bins = tmp_path / "bins"
    bins.mkdir()
    keys = sorted(tensors)
    torch.save({k: tensors[k] for k in keys[:10]}, bins / "pytorch_model-00001-of-00002.bin")
    torch.save({k: tensors[k] for k in keys[10:]}, bins / "pytorch_model-00002-of-00002.bin")
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 if i < 10 else 2}-of-00002.bin" for i, k in enumerate(keys)}}))
    a = [(r.name, r.sigma) for r in lipcheck.analyze(single).layers]
    b = [(r.name, r.sigma) for r in lipcheck.analyze(bins).layers]
    assert a == b and len(a) == 16


def _index(folder: Path) -> dict[str, object]:
    return json.loads((folder / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("damage", ["missing", "escape", "absolute", "symlink", "truncated", "twice",
                                    "wrong-shard", "empty"])
def test_bad_folders_are_one_line_errors(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _save_folder(tmp_path / "m", _llama(), shards=2)
    index = _index(folder)
    wm: dict[str, str] = index["weight_map"]  # type: ignore[assignment]
    first = next(iter(wm))
    if damage == "missing":
        os.remove(folder / wm[first])
    elif damage == "escape":
        wm[first] = "../outside.safetensors"
    elif damage == "absolute":
        wm[first] = "/etc/passwd"
    elif damage == "symlink":
        target = tmp_path / "elsewhere.safetensors"
        (folder / wm[first]).rename(target)
        os.symlink(target, folder / wm[first])
    elif damage == "truncated":
        path = folder / wm[first]
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "wrong-shard":
        other = next(v for v in wm.values() if v != wm[first])
        wm[first] = other
    elif damage == "empty":
        index = {"weight_map": {}}
    if damage == "twice":
        text = json.dumps(index)[:-2] + f', "{first}": "{wm[first]}"}}}}'
        (folder / "model.safetensors.index.json").write_text(text)
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code = run(["inspect", str(folder), "--no-progress", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lipcheck: error:")


def test_input_shape_on_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _save_folder(tmp_path / "m", _llama(), shards=1)
    assert run(["inspect", str(folder), "--input-shape", "1,32", "--no-progress"]) == 2
    assert "--input-shape is not used for a model folder" in capsys.readouterr().err
