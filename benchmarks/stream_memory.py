"""Peak memory of the streaming prune (``depgraph.prune_checkpoint``) against model size.

Run::

    python benchmarks/stream_memory.py                    # 4, 24, 48 layers; writes results/stream_memory.md
    python benchmarks/stream_memory.py --layers 2 --out ''  # a quick look, printed only

For each depth, a synthetic Llama checkpoint (hidden 2048, 32 query / 4 key-value heads,
MLP 8192, vocabulary 32000: every tensor has the same shape at every depth) is written to a
temporary directory in bf16 with random weights, as safetensors shards of at most
``--shard-mb`` MB, an index and a ``config.json``. It is generated shard by shard (the whole
model is never in memory). A fresh Python process then builds the model on ``meta``, analyzes
it, solves a plan (30 % of every MLP width and 2 of the 4 key-value heads of every layer,
``importance="random"``) and streams the checkpoint through ``prune_checkpoint``, ``--repeats``
times (3), each into an empty directory. That process reports its own memory from
``/proc/self/status`` (not ``ru_maxrss``, which a child started by fork and exec inherits from
its parent's peak):

- *after analysis*: ``VmHWM`` (peak RSS) once imports, the meta model, the analysis and the
  plan are done: the fixed overhead;
- *peak during prune*: ``VmHWM`` over ``prune_checkpoint`` alone (reset before it by writing 5
  to ``/proc/self/clear_refs``), and the most it rose above the RSS it started from;
- the peaks of anonymous and file-backed resident memory, sampled every 10 ms by a thread:
  pages of a memory-mapped source shard that have been read count as file-backed RSS.

The output of the smallest depth is then loaded with ``from_pretrained`` on the CPU (config
sizes, parameter count, one forward) and, at every depth, a few tensors are compared with the
source sliced by the plan. The checkpoints are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "stream_memory.md"
WIDTH = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
MLP_RATIO, KV_KEEP = 0.3, 2
MB = 10**6
Shapes = list[tuple[str, tuple[int, ...]]]
"""(name, shape) of checkpoint tensors."""


# -- the synthetic checkpoint ------------------------------------------------------------


def llama_config(layers: int) -> Any:
    """The benchmark's Llama configuration with ``layers`` layers, saved as bf16."""
    import transformers

    return transformers.LlamaConfig(num_hidden_layers=layers, architectures=["LlamaForCausalLM"],
                                    torch_dtype="bfloat16", **WIDTH)


def tensor_shapes(config: Any) -> Shapes:
    """(name, shape) of every tensor of the checkpoint, in the model's order (from a meta model)."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def shard_layout(shapes: Shapes, shard_bytes: int) -> list[Shapes]:
    """Consecutive tensors packed into shards of at most ``shard_bytes`` (bf16); a larger tensor
    gets a shard of its own."""
    shards: list[Shapes] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, everything else normal with standard deviation 0.02, in bf16."""
    values = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02)
    if name.endswith("norm.weight"):
        values.add_(1.0)
    return values.to(torch.bfloat16)


def write_checkpoint(folder: Path, layers: int, shard_bytes: int, seed: int = 0) -> dict[str, Any]:
    """A random bf16 Llama of ``layers`` layers in ``folder``, one shard in memory at a time;
    returns its parameter count, bytes, number of shards and largest shard and tensor (bytes)."""
    from safetensors.torch import save_file

    config = llama_config(layers)
    shards = shard_layout(tensor_shapes(config), shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, sizes = {}, []
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, generator) for name, shape in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        sizes.append(sum(t.numel() * 2 for t in tensors.values()))
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(str(folder))
    largest_tensor = max(2 * math.prod(shape) for shard in shards for _, shape in shard)
    return {"params": sum(sizes) // 2, "bytes": sum(sizes), "shards": len(shards), "largest_shard": max(sizes),
            "largest_tensor": largest_tensor}


# -- the measured process ------------------------------------------------------------------


def status(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in bytes (``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``)."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0]) * 1024
    return found


class Sampler(threading.Thread):
    """Peaks of anonymous and file-backed RSS, read every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval, self.peaks, self.done = interval, {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for key, value in status(*self.peaks).items():
                self.peaks[key] = max(self.peaks[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peaks


def benchmark_plan(analysis: Any) -> Any:
    """30 % of every MLP width and 2 of the 4 key-value heads of every layer, chosen at random."""
    import depgraph

    def rows_of(group: Any, suffix: str) -> bool:  # not the hidden size, which every projection reads
        return any(m.name.endswith(suffix) and m.dim == 0 for m in group.members)

    mlp = {g.index: MLP_RATIO for g in analysis.groups if rows_of(g, "mlp.gate_proj.weight")}
    kv = {g.index: 1 - KV_KEEP / g.size for g in analysis.groups
          if g.size == WIDTH["num_key_value_heads"] and rows_of(g, "k_proj.weight")}
    return depgraph.solve(analysis, {**mlp, **kv}, importance="random", seed=0)


def child(src: Path, out: Path) -> dict[str, Any]:
    """Analyze, plan and stream ``src`` to ``out`` in this process; its times and memory."""
    import depgraph
    from depgraph.stream import meta_model

    start = time.perf_counter()
    meta = meta_model(src)
    analysis = depgraph.analyze(meta, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta"),
                                       "use_cache": False})
    plan = benchmark_plan(analysis)
    analyzed = time.perf_counter()
    before = status("VmHWM", "VmRSS", "RssAnon", "RssFile")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of what follows
    sampler = Sampler()
    sampler.start()
    depgraph.prune_checkpoint(src, plan, out, analysis=analysis, progress=False)
    peaks = sampler.stop()
    during = status("VmHWM")["VmHWM"]
    plan.save(out.parent / f"{out.name}-plan.json")
    return {"analysis_s": analyzed - start, "prune_s": time.perf_counter() - analyzed,
            "hwm_after_analysis": before["VmHWM"], "rss_before_prune": before["VmRSS"], "hwm_prune": during,
            "anon_rise": peaks["RssAnon"] - before["RssAnon"], "file_rise": peaks["RssFile"] - before["RssFile"]}


def measure(src: Path, out: Path) -> dict[str, Any]:
    """:func:`child` in a fresh Python process; its report plus the process's wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(src), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the streaming process failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


# -- checking the output ---------------------------------------------------------------------


def check_values(src: Path, out: Path, layers: int) -> tuple[int, dict[str, int]]:
    """Compare a few output tensors with the source sliced by the saved plan: how many, and the
    sizes the plan gives layer 0 (``intermediate_size``, ``num_key_value_heads``)."""
    from safetensors import safe_open

    import depgraph
    from depgraph.stream import meta_model

    analysis = depgraph.analyze(meta_model(src), {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta"),
                                                  "use_cache": False})
    removed = depgraph.Plan.load(out.parent / f"{out.name}-plan.json").removed_entries(analysis)
    last = layers - 1
    names = [f"model.layers.{last}.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             f"model.layers.{last}.self_attn.o_proj.weight", "model.norm.weight"]
    files = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        with safe_open(str(src / files[name]), "pt") as f:
            expected = f.get_tensor(name)
        for (entry, dim), gone in removed.items():
            if entry == name and bool(gone.any()):
                expected = expected.index_select(dim, (~gone).nonzero().flatten())
        with safe_open(str(out / files[name]), "pt") as f:
            found = f.get_tensor(name)
        if not torch.equal(found, expected):
            raise AssertionError(f"{name}: the streamed tensor differs from the source sliced by the plan")
    head_dim = WIDTH["hidden_size"] // WIDTH["num_attention_heads"]
    kept = {"hidden_size": WIDTH["hidden_size"],
            "intermediate_size": int((~removed[("model.layers.0.mlp.gate_proj.weight", 0)]).sum()),
            "num_key_value_heads": int((~removed[("model.layers.0.self_attn.k_proj.weight", 0)]).sum()) // head_dim}
    if any(bool(gone.any()) for (name, dim), gone in removed.items() if name == "model.norm.weight"):
        raise AssertionError("the plan prunes the hidden size: it should prune MLP widths and key-value heads only")
    return len(names), kept


def check_loads(out: Path, kept: dict[str, int]) -> str:
    """Load ``out`` with ``from_pretrained`` on the CPU: its config has the ``kept`` sizes, and a
    forward runs."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    found = {key: getattr(model.config, key) for key in kept}
    if found != kept:
        raise AssertionError(f"the reloaded config has {found}, the plan keeps {kept}")
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    if not torch.isfinite(logits).all():
        raise AssertionError("the reloaded model gives non-finite logits")
    params = sum(p.numel() for p in model.parameters())
    if 2 * params != sum(f.stat().st_size for f in out.glob("*.safetensors")) - _headers(out):
        raise AssertionError(f"the reloaded model has {params} parameters, not the checkpoint's")
    sizes = ", ".join(f"{key} {value}" for key, value in found.items())
    return (f"`from_pretrained` loads it as {type(model).__name__} with {sizes} (the plan's sizes) and "
            f"{params / 1e9:.3f} B parameters, as many as the checkpoint holds; one forward gives finite logits "
            f"of shape {tuple(logits.shape)}")


def _headers(folder: Path) -> int:
    """Bytes of the safetensors headers (size prefix included) of the files in ``folder``."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            total += 8 + int.from_bytes(handle.read(8), "little")
    return total


# -- the report --------------------------------------------------------------------------------


def run_depth(root: Path, layers: int, shard_bytes: int, repeats: int, load: bool) -> dict[str, Any]:
    """Generate, stream ``repeats`` times and check one depth: the run of the highest peak, the
    rise of every run, and the reload note when ``load``."""
    src, out = root / f"llama-{layers}", root / f"llama-{layers}-pruned"
    start = time.perf_counter()
    info = write_checkpoint(src, layers, shard_bytes)
    print(f"{layers} layers: {info['params'] / 1e9:.2f} B parameters written in {time.perf_counter() - start:.0f} s",
          flush=True)
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)  # a rerun into a finished directory would skip every shard
        runs.append(measure(src, out))
    row = {"layers": layers, **info, **max(runs, key=lambda r: r["hwm_prune"]),
           "rises": [r["hwm_prune"] - r["rss_before_prune"] for r in runs]}
    row["out_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    row["checked"], kept = check_values(src, out, layers)
    row["loaded"] = check_loads(out, kept) if load else ""
    print(json.dumps(row), flush=True)
    shutil.rmtree(src)
    shutil.rmtree(out)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    header = ["layers", "parameters", "checkpoint GB", "pruned GB", "shards", "largest shard MB", "largest tensor MB",
              "analysis s", "prune s", "RSS after analysis MB", "peak RSS during prune MB",
              "rise above start MB, each run", "rise of anon / file-backed RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["layers"], f"{r['params'] / 1e9:.2f} B", f"{r['bytes'] / 1e9:.2f}", f"{r['out_bytes'] / 1e9:.2f}",
                 r["shards"], f"{r['largest_shard'] / MB:.0f}", f"{r['largest_tensor'] / MB:.0f}",
                 f"{r['analysis_s']:.1f}", f"{r['prune_s']:.1f}", f"{r['hwm_after_analysis'] / MB:.0f}",
                 f"{r['hwm_prune'] / MB:.0f}", ", ".join(f"{rise / MB:.0f}" for rise in r["rises"]),
                 f"{r['anon_rise'] / MB:.0f} / {r['file_rise'] / MB:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import safetensors
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM (shared with other "
            f"jobs), Linux {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, safetensors {safetensors.__version__}")


def report(rows: list[dict[str, Any]], shard_mb: int, repeats: int, command: str) -> str:
    loaded = next(r for r in rows if r["loaded"])
    return "\n".join([
        "# Peak memory of the streaming prune against model size", "",
        f"Regenerate: `{command}`", "",
        f"Machine: {machine()}.", "",
        f"Synthetic Llama checkpoints (hidden 2048, MLP 8192, 32 query / 4 key-value heads, vocabulary 32000, "
        f"bf16, random weights) in safetensors shards of at most {shard_mb} MB; the plan removes "
        f"{MLP_RATIO:.0%} of every MLP width and {WIDTH['num_key_value_heads'] - KV_KEEP} of the 4 key-value "
        f"heads of every layer. Each depth is streamed {repeats} times, each time in a fresh process, into an "
        "empty directory; the row shows the run with the highest peak, and the rise of every run. The source "
        "files were just written, so they are read from the page cache.", "",
        table(rows), "",
        "- *RSS after analysis*: peak RSS once torch and transformers are imported and the meta model is "
        "built, analyzed and planned: the fixed overhead.",
        "- *peak RSS during prune*: VmHWM over `prune_checkpoint` alone (reset just before it); *rise above "
        "start*: that peak less the RSS at its start.",
        "- *rise of anon / file-backed RSS*: the peaks of `RssAnon` and `RssFile`, sampled every 10 ms, less "
        "their values at the start (they need not peak together). `prune_checkpoint` reads each source "
        "tensor into a buffer of its own (no memory map, whose pages read would stay resident until the "
        "shard is closed: a whole shard, in an earlier version) and gives the freed heap back after each "
        "shard, so the anonymous rise is about one source tensor and its pruned copy plus the allocator's "
        "slack.", "",
        f"Checked: at every depth {rows[0]['checked']} tensors of the output equal the source sliced by the "
        f"plan; at {loaded['layers']} layers {loaded['loaded']}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,24,48", help="comma-separated depths (default 4,24,48)")
    parser.add_argument("--shard-mb", type=int, default=500, help="largest source shard, MB (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="streaming runs per depth (default 3)")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' prints only)")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    depths = [int(d) for d in args.layers.split(",")]
    with tempfile.TemporaryDirectory(prefix="stream-memory-", dir="/tmp") as root:
        rows = [run_depth(Path(root), d, args.shard_mb * MB, args.repeats, load=d == min(depths)) for d in depths]
    command = " ".join(["python benchmarks/stream_memory.py", *sys.argv[1:]])
    text = report(rows, args.shard_mb, args.repeats, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
