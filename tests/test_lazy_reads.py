"""Opening a model folder reads headers only: no tensor is read until the analysis asks for it
(Mapping's default ``in`` reads the value; a folder check used it on every tensor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lipcheck.formats import safetensors_format
from lipcheck.formats.checkpoint_folder import load_checkpoint_folder


def _folder(path: Path, extra_in_shard: bool) -> Path:
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    a = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(6, 4, generator=g) for i in range(3)}
    b = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(4, 6, generator=g) for i in range(3)}
    if extra_in_shard:
        b["not.in.the.index"] = torch.zeros(2)
    save_file(a, str(path / "model-00001-of-00002.safetensors"))
    save_file(b, str(path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in b if k != "not.in.the.index"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize("extra_in_shard", [False, True])
def test_opening_a_folder_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          extra_in_shard: bool) -> None:
    reads: list[str] = []
    real = safetensors_format.SafetensorsFile.__getitem__

    def counting(self: safetensors_format.SafetensorsFile, name: str) -> torch.Tensor:
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(safetensors_format.SafetensorsFile, "__getitem__", counting)
    loaded = load_checkpoint_folder(_folder(tmp_path / "m", extra_in_shard))
    assert reads == []
    tensors = loaded.tensors
    assert tensors is not None and "model.layers.1.mlp.up_proj.weight" in tensors and "nope" not in tensors
    assert ("not.in.the.index" in tensors) is False
    assert reads == []
    assert tensors["model.layers.2.mlp.down_proj.weight"].shape == (4, 6)
    assert reads == ["model.layers.2.mlp.down_proj.weight"]
    assert len(tensors) == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_read_float64_is_the_exact_widening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            dtype: torch.dtype, chunk: int) -> None:
    """Chunked widening (chunks of a few bytes too) gives exactly the stored values as float64."""
    monkeypatch.setattr(safetensors_format, "READ_CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(37, 11, generator=g) * 3).to(dtype)
    save_file({"w": w, "ids": torch.arange(5)}, str(tmp_path / "m.safetensors"))
    f = safetensors_format.SafetensorsFile(tmp_path / "m.safetensors")
    wide = f.read_float64("w")
    assert wide is not None and wide.dtype == torch.float64
    assert torch.equal(wide, w.to(torch.float64))
    assert f.read_float64("ids") is None  # integers are read as stored


def test_read_float64_of_a_file_cut_short(tmp_path: Path) -> None:
    from lipcheck.errors import InputError

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    f = safetensors_format.SafetensorsFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(InputError):
        f.read_float64("w")


def test_update_rules_list_unmatched_matrices_from_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The update gate's matching (new, missing, reshaped matrices) reads headers, not tensors:
    update_norms has read them already."""
    from lipcheck.updates import update_rules

    a = load_checkpoint_folder(_folder(tmp_path / "a", False)).tensors
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 4), "model.extra.weight": torch.zeros(3, 3)},
              str(b_dir / "model.safetensors"))
    b = load_checkpoint_folder(b_dir).tensors
    assert a is not None and b is not None
    reads: list[str] = []
    real = safetensors_format.SafetensorsFile.__getitem__
    monkeypatch.setattr(safetensors_format.SafetensorsFile, "__getitem__",
                        lambda self, name: reads.append(name) or real(self, name))
    out = update_rules("b", "a", a, b, [], max_delta_sigma=1.0, max_relative_delta=None)
    assert reads == []
    text = out[0].message
    assert "not in the baseline: model.extra.weight" in text
    assert "shape changed: model.layers.0.mlp.up_proj.weight" in text
