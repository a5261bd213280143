"""normalize on safetensors files and Hugging Face model folders: every selected matrix as
stored (after rounding to its dtype) at or under the target by float64 SVD, every other
tensor byte-identical, header, index, layout and other files kept; bad inputs exit 2 with
nothing written."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import Cli
from safetensors.torch import save_file

from lipcheck.formats.safetensors_format import SafetensorsFile


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def llama(dtype: torch.dtype, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = _gen(seed)
    h, ff, v = 24, 40, 64
    shard1 = {"model.embed_tokens.weight": torch.randn(v, h, generator=g).to(dtype)}
    shard2: dict[str, torch.Tensor] = {}
    for i in range(2):
        p = f"model.layers.{i}"
        dst = shard1 if i == 0 else shard2
        dst[f"{p}.input_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        for n, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (8, h)), ("self_attn.v_proj", (8, h)),
                         ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (ff, h)), ("mlp.up_proj", (ff, h)),
                         ("mlp.down_proj", (h, ff))):
            dst[f"{p}.{n}.weight"] = (3 * torch.randn(*shape, generator=g)).to(dtype)
    shard2["model.norm.weight"] = torch.ones(h).to(dtype)
    shard2["lm_head.weight"] = torch.randn(v, h, generator=g).to(dtype)
    return [shard1, shard2]


def moe(dtype: torch.dtype, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = _gen(seed)
    return [{"model.embed_tokens.weight": torch.randn(32, 16, generator=g).to(dtype),
             "model.layers.0.mlp.router.weight": torch.randn(4, 16, generator=g).to(dtype),
             "model.layers.0.mlp.experts.gate_up_proj": (2 * torch.randn(4, 48, 16, generator=g)).to(dtype),
             "model.layers.0.mlp.experts.down_proj": (2 * torch.randn(4, 16, 24, generator=g)).to(dtype),
             "model.layers.0.post_attention_layernorm.weight": torch.ones(16).to(dtype)}]


def gpt2(dtype: torch.dtype, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    g = _gen(seed)
    return [{"wte.weight": torch.randn(40, 16, generator=g).to(dtype),
             "wpe.weight": torch.randn(12, 16, generator=g).to(dtype),
             "h.0.ln_1.weight": torch.ones(16).to(dtype), "h.0.ln_1.bias": torch.zeros(16).to(dtype),
             "h.0.attn.c_attn.weight": (4 * torch.randn(16, 48, generator=g)).to(dtype),  # Conv1D: [in, out]
             "h.0.attn.c_attn.bias": torch.randn(48, generator=g).to(dtype),
             "h.0.attn.c_proj.weight": (4 * torch.randn(16, 16, generator=g)).to(dtype),
             "h.0.mlp.c_fc.weight": (4 * torch.randn(16, 64, generator=g)).to(dtype),
             "h.0.mlp.c_proj.weight": (4 * torch.randn(64, 16, generator=g)).to(dtype)}]


def write_folder(folder: Path, shards: list[dict[str, torch.Tensor]]) -> Path:
    folder.mkdir()
    n = len(shards)
    weight_map = {}
    for k, tensors in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt", "note": f"shard {k}"})
        weight_map.update({t: name for t in tensors})
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 12345}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "test", "hidden_size": 24}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "generation_config.json").write_text('{"do_sample": false}')
    return folder


def raw(path: Path) -> dict[str, str]:
    """Tensor name -> sha256 of its raw bytes, read from the header's offsets."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: hashlib.sha256(data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]).hexdigest()
            for k, v in header.items()}


def header_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8 + n]


def is_selected(name: str, t: torch.Tensor) -> bool:
    return t.ndim >= 2 and "embed" not in name and not name.startswith(("wte", "wpe"))


def sigma(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t.to(torch.float64), ord=2).max())


def check_written(src: Path, out: Path, target: float) -> int:
    """Per shard: header identical, unselected tensors byte-identical, selected matrices as
    stored at or under the target (each expert on its own). Returns how many were rescaled."""
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    rescaled = 0
    for name in shards:
        assert header_bytes(out / name) == header_bytes(src / name)
        before, after = raw(src / name), raw(out / name)
        assert list(before) == list(after)
        written = SafetensorsFile(out / name)
        original = SafetensorsFile(src / name)
        for key in before:
            t = written[key]
            assert t.dtype == original[key].dtype
            if is_selected(key, t):
                if sigma(original[key]) > target:
                    rescaled += 1
                    assert before[key] != after[key]
                assert sigma(t) <= target, (key, sigma(t))
                assert sigma(t) >= target * 0.97, (key, sigma(t))  # not needlessly far under
            else:
                assert before[key] == after[key], key
    return rescaled


@pytest.mark.parametrize("make", [llama, moe, gpt2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_folder_normalized_as_stored(tmp_path: Path, cli: Cli, make, dtype) -> None:
    src = write_folder(tmp_path / "src", make(dtype))
    out = tmp_path / "out"
    code, _, err = cli("normalize", src, "-o", out, "--target", "0.75")
    assert code == 0, err
    assert check_written(src, out, 0.75) > 0
    for extra in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / extra).read_bytes() == (src / extra).read_bytes()
    index = src / "model.safetensors.index.json"
    if index.exists():
        old, new = json.loads(index.read_text()), json.loads((out / index.name).read_text())
        assert new["weight_map"] == old["weight_map"]
        total = sum(t.numel() * t.element_size() for shard in make(dtype) for t in shard.values())
        assert new["metadata"]["total_size"] == total
    assert not list(tmp_path.glob(".*lipcheck-tmp"))


def test_bf16_rounding_is_accounted_for(tmp_path: Path, cli: Cli) -> None:
    """Many bf16 matrices at a target: as stored, none is above it (a plain scale-and-round
    pushes some up by up to ~2^-8 relative)."""
    g = _gen(5)
    tensors = {f"layers.{i}.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16) for i in range(24)}
    src = write_folder(tmp_path / "src", [tensors])
    out = tmp_path / "out"
    assert cli("normalize", src, "-o", out, "--target", "1")[0] == 0
    written = SafetensorsFile(out / "model.safetensors")
    for key in tensors:
        assert sigma(written[key]) <= 1.0


def test_single_safetensors_file(tmp_path: Path, cli: Cli) -> None:
    src_folder = write_folder(tmp_path / "src", llama(torch.bfloat16))
    # one file holding every tensor
    tensors = {k: v for shard in llama(torch.bfloat16) for k, v in shard.items()}
    single = tmp_path / "m.safetensors"
    save_file(tensors, single, metadata={"format": "pt"})
    out = tmp_path / "n.safetensors"
    code, _, err = cli("normalize", single, "-o", out, "--target", "2", "--exclude", "lm_head*")
    assert code == 0, err
    assert header_bytes(out) == header_bytes(single)
    before, after = raw(single), raw(out)
    written = SafetensorsFile(out)
    for key, t in tensors.items():
        if is_selected(key, t) and key != "lm_head.weight":
            assert sigma(written[key]) <= 2.0
        else:
            assert before[key] == after[key], key
    assert src_folder.exists()


def test_embeddings_selected_with_layers(tmp_path: Path, cli: Cli) -> None:
    src = write_folder(tmp_path / "src", moe(torch.float32))
    out = tmp_path / "out"
    assert cli("normalize", src, "-o", out, "--target", "0.5", "--layers", "model.embed_tokens")[0] == 0
    written = SafetensorsFile(out / "model.safetensors")
    assert sigma(written["model.embed_tokens.weight"]) <= 0.5
    assert raw(out / "model.safetensors")["model.layers.0.mlp.router.weight"] == \
        raw(src / "model.safetensors")["model.layers.0.mlp.router.weight"]


def test_output_exists_exit_2_and_force(tmp_path: Path, cli: Cli) -> None:
    src = write_folder(tmp_path / "src", llama(torch.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = cli("normalize", src, "-o", out)
    assert code == 2 and "exists" in err
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert cli("normalize", src, "-o", out, "--force")[0] == 0
    assert not (out / "keep").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".*lipcheck-tmp"))


def test_bad_inputs_exit_2_nothing_written(tmp_path: Path, cli: Cli) -> None:
    src = write_folder(tmp_path / "src", llama(torch.float32))
    # into itself
    code, _, err = cli("normalize", src, "-o", src / "sub")
    assert code == 2 and "itself" in err and not (src / "sub").exists()
    # over a file
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli("normalize", src, "-o", f, "--force")
    assert code == 2 and f.read_text() == "x"
    # an unreadable (truncated) shard
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    out = tmp_path / "out"
    code, _, err = cli("normalize", src, "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".*lipcheck-tmp"))


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_folder_written_with_torch_save(tmp_path: Path, cli: Cli, sharded: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    g = _gen(0)
    shards = [{"model.embed_tokens.weight": torch.randn(20, 8, generator=g).to(torch.bfloat16),
               "layers.0.weight": (3 * torch.randn(8, 8, generator=g)).to(torch.bfloat16),
               "layers.0.norm.weight": torch.ones(8)},
              {"layers.1.weight": (3 * torch.randn(12, 8, generator=g)),
               "lm_head.weight": torch.randn(20, 8, generator=g)}]
    if sharded:
        weight_map = {}
        for k, tensors in enumerate(shards, 1):
            name = f"pytorch_model-{k:05d}-of-00002.bin"
            torch.save(tensors, src / name)
            weight_map.update({t: name for t in tensors})
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save({k: v for s in shards for k, v in s.items()}, src / "pytorch_model.bin")
    (src / "config.json").write_text("{}")
    out = tmp_path / "out"
    code, _, err = cli("normalize", src, "-o", out, "--target", "1")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for name in [p.name for p in src.glob("*.bin")]:
        before = torch.load(src / name, weights_only=True)
        after = torch.load(out / name, weights_only=True)
        assert list(before) == list(after)
        for key, t in before.items():
            assert after[key].dtype == t.dtype
            if t.ndim == 2 and "embed" not in key:
                assert sigma(after[key]) <= 1.0
            else:
                assert torch.equal(after[key], t)
    assert not list(tmp_path.glob(".*lipcheck-tmp"))
