"""check --baseline CHECKPOINT --max-delta-sigma / --max-relative-delta: gates on the
certified upper bound of sigma(W_new - W_old), checked against the exact norm of the
difference computed here in float64."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import Cli
from safetensors.torch import save_file


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, dict[str, float], dict[str, float]]:
    """An old and a new model folder (one with fused experts); the exact update norms and
    relative update norms per row name."""
    g = _gen(3)
    old = {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
           "model.layers.0.mlp.experts.down_proj": torch.randn(3, 16, 24, generator=g),
           "model.norm.weight": torch.ones(16),
           "lm_head.weight": torch.randn(30, 16, generator=g)}
    scale = {"model.layers.0.self_attn.q_proj.weight": 0.01, "model.layers.0.mlp.experts.down_proj": 0.2,
             "model.norm.weight": 0.1, "lm_head.weight": 0.001}
    new = {k: v + scale[k] * torch.randn(v.shape, generator=g) for k, v in old.items()}
    old = {k: v.to(dtype) for k, v in old.items()}
    new = {k: v.to(dtype) for k, v in new.items()}
    folders = []
    for name, tensors in (("old", old), ("new", new)):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text("{}")
        folders.append(d)
    delta, rel = {}, {}
    for k in old:
        if old[k].ndim < 2:
            continue
        a, b = old[k].double(), new[k].double()
        mats = ([(k.removesuffix(".weight"), a, b)] if a.ndim == 2
                else [(f"{k}[{e}]", a[e], b[e]) for e in range(a.shape[0])])
        for name, wa, wb in mats:
            delta[name] = float(torch.linalg.matrix_norm(wb - wa, ord=2))
            rel[name] = delta[name] / float(torch.linalg.matrix_norm(wa, ord=2))
    return folders[0], folders[1], delta, rel


def test_max_delta_sigma_against_exact(tmp_path: Path, cli: Cli) -> None:
    old, new, delta, _ = pair(tmp_path)
    worst = max(delta, key=lambda n: delta[n])
    # a limit just below the largest exact update fails on that matrix (the upper bound is >= exact)
    limit = delta[worst] * 0.999
    code, _, err = cli("check", new, "--baseline", old, "--max-delta-sigma", limit)
    assert code == 1
    assert f"matrix {worst}:" in err and "max-delta-sigma" in err and "[certified]" in err
    failed = {n for n in delta if f"matrix {n}:" in err}
    assert {n for n in delta if delta[n] > limit} <= failed
    # a limit above every exact update by more than the certificate's gap passes
    code, out, err = cli("check", new, "--baseline", old, "--max-delta-sigma", max(delta.values()) * 1.01,
                         "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    rules = {r["rule"]: r for r in doc["results"]}
    assert rules["max-delta-sigma"]["passed"]
    assert delta[worst] <= rules["max-delta-sigma"]["value"] <= delta[worst] * (1 + 1e-3)


def test_max_relative_delta_against_exact(tmp_path: Path, cli: Cli) -> None:
    old, new, _, rel = pair(tmp_path)
    assert max(rel.values()) > 0.05 > min(rel.values())
    code, _, err = cli("check", new, "--baseline", old, "--max-relative-delta", 0.05)
    assert code == 1
    for name, r in rel.items():
        if r > 0.05:
            assert f"matrix {name}:" in err
        if r < 0.05 * 0.99:
            assert f"matrix {name}:" not in err
    assert cli("check", new, "--baseline", old, "--max-relative-delta", max(rel.values()) * 1.01)[0] == 0


def test_update_gates_bf16_and_outputs(tmp_path: Path, cli: Cli) -> None:
    old, new, delta, _ = pair(tmp_path, torch.bfloat16)
    limit = max(delta.values()) * 0.999
    code, md, _ = cli("check", new, "--baseline", old, "--max-delta-sigma", limit, "--format", "markdown")
    assert code == 1 and "max-delta-sigma" in md
    code, junit, _ = cli("check", new, "--baseline", old, "--max-delta-sigma", limit, "--format", "junit")
    assert code == 1 and "max-delta-sigma" in junit and "<failure" in junit


def test_update_gates_bad_input(tmp_path: Path, cli: Cli) -> None:
    old, new, _, _ = pair(tmp_path)
    code, _, err = cli("check", new, "--max-delta-sigma", 1)
    assert code == 2 and "--baseline" in err
    code, _, err = cli("check", new, "--baseline", tmp_path / "nope", "--max-delta-sigma", 1)
    assert code == 2 and "does not exist" in err
    code, _, err = cli("check", new, "--baseline", old, "--max-delta-sigma", -1)
    assert code == 2
    report = tmp_path / "r.json"
    assert cli("inspect", old, "--format", "json", "-o", report)[0] == 0
    code, _, err = cli("check", new, "--baseline", report, "--max-relative-delta", 0.1)
    assert code == 2 and "report" in err


def test_unmatched_matrices_fail_unless_allowed(tmp_path: Path, cli: Cli) -> None:
    old, new, _, _ = pair(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(new / "model.safetensors")
    tensors["extra.weight"] = torch.randn(4, 16, generator=_gen(9))
    save_file(tensors, new / "model.safetensors")
    code, _, err = cli("check", new, "--baseline", old, "--max-delta-sigma", 100)
    assert code == 1 and "update-match" in err and "extra.weight" in err
    assert cli("check", new, "--baseline", old, "--max-delta-sigma", 100, "--allow-unmatched")[0] == 0
