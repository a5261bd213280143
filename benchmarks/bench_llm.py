"""A Llama-shaped bf16 checkpoint folder (0.54 B parameters: 8 blocks of width 2048, MLP 5632,
vocab 32000; about 1.1 GB in three safetensors shards): ``lipcheck inspect <folder>`` against
a full-SVD loop over the same matrices (``torch.linalg.svdvals`` per matrix in float32, one
at a time: what WeightWatcher does), each in its own fresh process, in the same run.

Reported: wall time of each process (imports included), peak RSS of each (ru_maxrss of the
child), the time ratio lipcheck / SVD loop, and the largest gap between lipcheck's sigma and
the SVD's (lipcheck's estimate is a lower bound, its sigma_upper an upper one: both are
checked against the SVD values). The folder is built once under --folder (default
/tmp/lipcheck-bench-llm; never in the repository) and reused.

Targets (issue 13): peak RSS <= 1.2 GB, time <= 0.25 x the SVD loop.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
import torch

BLOCKS, WIDTH, MLP, VOCAB, HEADS, KV_HEADS = 8, 2048, 5632, 32000, 16, 16

SVD_LOOP = r"""
import json, sys, time
import torch
from safetensors import safe_open
folder = sys.argv[1]
index = json.load(open(folder + "/model.safetensors.index.json"))["weight_map"]
out = {}
t = time.perf_counter()
for name, shard in sorted(index.items()):
    with safe_open(folder + "/" + shard, "pt") as f:
        w = f.get_tensor(name)
    if w.ndim != 2:
        continue
    out[name] = float(torch.linalg.svdvals(w.float())[0])
    del w
print(json.dumps({"seconds": time.perf_counter() - t, "sigma": out}))
"""


def build(folder: Path) -> int:
    """The seeded folder (reused when its index is there); returns the parameter count."""
    from safetensors.torch import save_file

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, WIDTH),
                                         "lm_head.weight": (VOCAB, WIDTH), "model.norm.weight": (WIDTH,)}
    for i in range(BLOCKS):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (WIDTH, WIDTH)), ("self_attn.k_proj", (WIDTH, WIDTH)),
                            ("self_attn.v_proj", (WIDTH, WIDTH)), ("self_attn.o_proj", (WIDTH, WIDTH)),
                            ("mlp.gate_proj", (MLP, WIDTH)), ("mlp.up_proj", (MLP, WIDTH)),
                            ("mlp.down_proj", (WIDTH, MLP))):
            shapes[p + name + ".weight"] = shape
        shapes[p + "input_layernorm.weight"] = (WIDTH,)
        shapes[p + "post_attention_layernorm.weight"] = (WIDTH,)
    params = sum(math.prod(s) for s in shapes.values())
    if (folder / "model.safetensors.index.json").exists():
        return params
    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    shards = [names[0:1] + names[3:3 + 9 * 3], names[3 + 9 * 3:3 + 9 * 6], names[3 + 9 * 6:] + names[1:3]]
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in part:
            shape = shapes[name]
            t = (torch.ones(shape) + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1
                 else torch.randn(shape, generator=g) / math.sqrt(shape[-1]))
            tensors[name] = t.to(torch.bfloat16)
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file))
        weight_map.update({name: file for name in part})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": BLOCKS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB}))
    return params


def child(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Runs ``cmd`` in a fresh process: (result, wall seconds, its peak RSS in bytes). The peak
    is the child's own VmHWM, read from /proc while it runs: ru_maxrss of a forked child counts
    the RSS of this (large) parent before the exec."""
    peak = 0
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        status = Path(f"/proc/{proc.pid}/status")
        time.sleep(0.3)  # past the fork-to-exec window, when /proc shows this parent's copy
        while proc.poll() is None:
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
                peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return res, wall, peak


def main(argv: list[str] | None = None) -> int:
    ap = h.parser(__doc__)
    ap.add_argument("--folder", default="/tmp/lipcheck-bench-llm", help="where the checkpoint is built and kept")
    args = ap.parse_args(argv)
    _, facts, bw = h.start(args, "lipcheck benchmark (LLM checkpoint): inspect vs a full-SVD loop", engine=False)
    folder = Path(args.folder)
    h.log(f"building (or reusing) {folder} ...")
    params = build(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"  checkpoint: {params / 1e9:.3f} B parameters, {size / 1e9:.2f} GB bf16 in "
          f"{len(list(folder.glob('*.safetensors')))} shards")
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        h.log("lipcheck inspect ...")
        ins, t_ins, rss_ins = child([sys.executable, "-m", "lipcheck", "inspect", str(folder), "--format", "json",
                                     "-o", str(report), "--no-progress"])
        if ins.returncode != 0:
            print(ins.stderr[-2000:])
            return 1
        doc = json.loads(report.read_text())
        h.log("full-SVD loop (svdvals per matrix, float32) ...")
        svd, t_svd, rss_svd = child([sys.executable, "-c", SVD_LOOP, str(folder)])
        if svd.returncode != 0:
            print(svd.stderr[-2000:])
            return 1
        svd_doc = json.loads(svd.stdout)
    rows = {r["name"] + ".weight": r for r in doc["layers"]}
    gaps, below, above = [], 0, 0
    for name, sigma in svd_doc["sigma"].items():
        r = rows[name]
        gaps.append(abs(r["sigma"] - sigma) / sigma)
        below += r["sigma"] <= sigma * (1 + 1e-5)
        above += r["sigma_upper"] >= sigma * (1 - 1e-5)
    kinds = sorted({r["upper_kind"] for r in doc["layers"] if r.get("upper_kind")})
    print(f"  {'process':<34}{'wall s':>9}{'peak RSS GB':>13}")
    print(f"  {'full-SVD loop (svdvals, fp32)':<34}{t_svd:>9.1f}{rss_svd / 1e9:>13.2f}"
          f"   (loop alone {svd_doc['seconds']:.1f} s)")
    print(f"  {'lipcheck inspect':<34}{t_ins:>9.1f}{rss_ins / 1e9:>13.2f}")
    print(f"  ratio lipcheck / SVD loop: {t_ins / t_svd:.3f} (target <= 0.25); peak RSS target <= 1.2 GB")
    print(f"  {len(gaps)} matrices: |sigma - svd| / svd max {max(gaps):.1e}; estimate <= svd on {below}, "
          f"upper >= svd on {above}; upper bounds: {', '.join(kinds)}")
    section = {"params": params, "bytes": size, "svd_loop_s": t_svd, "svd_loop_inner_s": svd_doc["seconds"],
               "svd_rss_bytes": rss_svd, "inspect_s": t_ins, "inspect_rss_bytes": rss_ins,
               "ratio": t_ins / t_svd, "max_rel_gap": max(gaps), "matrices": len(gaps),
               "estimate_below_svd": below, "upper_above_svd": above, "upper_kinds": kinds}
    h.write_json(args.json, args, facts, bw, [section], time.perf_counter() - t_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
