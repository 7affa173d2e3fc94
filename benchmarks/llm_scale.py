"""How analysis scales to LLM-sized models built on the meta device.

Run::

    python benchmarks/llm_scale.py                 # 8B, 70B and the depth sweep; writes results/llm_scale.md
    python benchmarks/llm_scale.py --configs 8b --depths 8,16   # printed only with --out ''

Each measurement runs in its own Python process, so its peak resident memory (``ru_maxrss``)
is its own: the model is a ``transformers`` ``LlamaForCausalLM`` built under
``torch.device("meta")`` (no weight memory), analyzed with ``tracer="export"`` on 16 token ids.
Wall time covers ``depgraph.analyze`` only (not importing or building the model).
The depth sweep uses a small Llama (hidden 256, 8 query / 2 key-value heads) with 8 to 128
layers, so the graph grows while each layer stays the same.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)

CHILD = """
import json, resource, sys, time, torch, depgraph
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(max_position_embeddings=8192, **json.loads(sys.argv[1]))
with torch.device("meta"):
    model = LlamaForCausalLM(cfg).eval()
ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
start = time.perf_counter()
a = depgraph.analyze(model, {"input_ids": ids, "use_cache": False}, tracer="export")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "groups": len(a.groups), "unsupported": len(a.unsupported),
                  "params": sum(p.numel() for p in model.parameters()),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(config: dict[str, int]) -> dict[str, float]:
    """Analyze one configuration in a fresh process; its timing and peak memory."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def config_rows(names: list[str]) -> list[str]:
    rows = ["| configuration | parameters | layers | groups | unsupported | analyze s | peak RSS MB | target |",
            "|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = measure(CONFIGS[name])
        if "error" in r:
            rows.append(f"| Llama-3-{name.upper()}-sized | | | | | failed: {r['error']} | | |")
            continue
        target = ("< 30 s and < 2048 MB: " + ("pass" if r["seconds"] < 30 and r["rss_mb"] < 2048 else "FAIL")
                  if name == "8b" else "")
        layers = CONFIGS[name]["num_hidden_layers"]
        rows.append(f"| Llama-3-{name.upper()}-sized | {r['params'] / 1e9:.1f} B | {layers} "
                    f"| {r['groups']} | {r['unsupported']} | {r['seconds']:.2f} | {r['rss_mb']:.0f} | {target} |")
    return rows


def depth_rows(depths: list[int]) -> list[str]:
    rows = ["| layers | groups | analyze s | ms per layer | peak RSS MB |", "|---|---|---|---|---|"]
    points = []
    for depth in depths:
        r = measure({**SMALL, "num_hidden_layers": depth})
        if "error" in r:
            rows.append(f"| {depth} | failed: {r['error']} | | | |")
            continue
        points.append((depth, r["seconds"]))
        rows.append(f"| {depth} | {r['groups']} | {r['seconds']:.2f} | {1000 * r['seconds'] / depth:.1f} "
                    f"| {r['rss_mb']:.0f} |")
    if len(points) >= 3:
        rows += ["", f"Growth exponent (slope of log time over log layers, 1 = linear): {slope(points[1:]):.2f}."]
    return rows


def slope(points: list[tuple[int, float]]) -> float:
    xs, ys = [math.log(d) for d, _ in points], [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="8b,70b")
    parser.add_argument("--depths", default="8,16,32,64,128")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "llm_scale.md"))
    args = parser.parse_args()
    import torch
    import transformers

    lines = ["# depgraph.analyze on LLM-sized models (meta device)", "",
             f"torch {torch.__version__}, transformers {transformers.__version__}; tracer='export'; "
             "wall time of analyze in a fresh process; peak RSS of that process (ru_maxrss).", "",
             *config_rows([c for c in args.configs.split(",") if c]), "",
             "## Depth sweep (hidden 256, 8 query / 2 key-value heads)", "",
             *depth_rows([int(d) for d in args.depths.split(",") if d])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
