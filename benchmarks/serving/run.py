"""Stock vLLM vs VTW, offline (the ``LLM`` engine) and online (``vllm serve``), in one run.

    python benchmarks/serving/run.py [--quick] [--models llava [llava_next]] [--parts ...]
                                     [--out DIR]

Four parts, each stock and VTW measured in the same run and reported as ratios to stock
(every timed figure: median [min-max] over the repeats), each in its own module next to
this script:

1. ``defaults`` (the headline, ``defaults.py``): stock vLLM and VTW both at vLLM's
   defaults, VTW with ``vtw_allowed_k`` [N/2, N] at K = N/2 and K = N; pass/fail lines
   for the bars.
2. ``groups`` (``groups.py``): what each KV cache group costs per decode step, VTW at
   K = N with 1, 2 and N/2 groups vs stock.
3. ``eager`` (``eager.py``): stock and VTW both with ``enforce_eager=True`` and prefix
   caching off.
4. ``online`` (``online.py``): ``vllm serve`` at defaults for both, loaded by vLLM's own
   ``vllm bench serve``.

``common.py`` holds what they share: the benchmark checkpoint, the engines, the offline
measurement, the fresh image per request (so that no prefix-cache hit is possible), the
child engines and their interleaving, run metadata. This script parses the options, runs
the parts' engines (the offline ones of a checkpoint at defaults side by side, then the
eager ones, then the online servers one after the other) and writes the report, the
figures and the plot: ``serving.md``, ``serving.json``, ``serving.png`` in ``--out``.

Time on 2 CPU cores: ~12 min for the default run (LLaVA-1.5-shaped only: six
engines, two servers); ``--quick`` (one repeat, shorter batches, no online part) 4-7
min; each extra model adds about as much again. Timings need an otherwise idle machine:
the report flags a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# The parts and what they share: modules next to this script (run as a file, its folder
# is the first entry of sys.path).
import defaults
import eager
import groups
import online
from common import (
    REPO,
    bench_checkpoint,
    engine_spec,
    meta_line,
    num_layers,
    offline_engines,
    over,
    run_meta,
)

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("defaults", "groups", "eager", "online")
# Engines, in the order they run, and the parts that need them.
ENGINE_PARTS = {
    "stock": ("defaults", "groups"),
    "vtw": ("defaults", "groups"),
    "vtw_1group": ("groups",),
    "vtw_group_size2": ("groups",),
    "stock_eager": ("eager",),
    "vtw_eager": ("eager",),
}


def report(results: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    """Markdown: per model, the defaults table first, then its bars, groups, eager, online."""
    lines = [
        "# Serving benchmark: stock vLLM vs VTW",
        "",
        meta_line(meta),
        f"Tensor parallel size {args.tensor_parallel_size} (offline and online engines), "
        f"data parallel size {args.data_parallel_size} (online servers). "
        f"Offline: {args.batch} image requests per batch, every request to an engine with "
        "an image it has not seen before (repeats included), so no prefix-cache hit is "
        "possible (the cached tokens the engines reported are in the last table); "
        f"{args.repeats} repeats, decode {args.decode_tokens} tokens, KV budget {args.kv_mib} "
        f"MiB, KV-bound {args.kv_bound_requests} requests x {args.kv_bound_tokens} tokens; "
        f"online (`vllm bench serve`, random-mm): {args.online_requests} streaming chat "
        f"requests per round, one image and {args.online_text_tokens} random text tokens "
        f"each, concurrency {args.concurrency}, {args.online_tokens} tokens each. Figures: "
        "median [min-max] over the repeats; ratios: VTW / stock of the same run.",
        "",
    ]
    for kind in args.models:
        res = results[kind]
        tokens = [v["prompt_tokens_per_request"] for v in res.values() if "num_layers" in v]
        per_request = f"; {tokens[0]} prompt tokens per request" if tokens else ""
        lines += [
            f"## {kind} (benchmark checkpoint: {num_layers(kind)} layers{per_request})",
            "",
        ]
        if "vtw" in res and "stock" in res:
            lines += defaults.section(kind, res, results.get("bars", []))
        if "vtw_1group" in res:
            lines += groups.section(res)
        if "vtw_eager" in res:
            lines += eager.section(kind, res)
        if "online_vtw" in res:
            lines += online.section(res, args)
        lines += [
            "Engines as run (read back from each engine's config; cached tokens: the prefix-"
            "cache hits the engine reported for its timed requests):",
            "",
            "| engine | prefix caching | enforce_eager | compilation | CUDA graphs | "
            "async sched. | max batched tokens | max seqs | KV groups | block size | "
            "cached tokens | child s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in res.items():
            if "per_k" not in r or name.startswith("online"):
                continue
            e = r["engine"]
            cached = sum(v["cached_tokens"] for v in r["per_k"].values())
            lines.append(
                f"| {name} | {e['enable_prefix_caching']} | {e['enforce_eager']} | "
                f"{e['compilation_mode']} | {e['cudagraph_mode']} | {e['async_scheduling']} | "
                f"{e['max_num_batched_tokens']} | {e['max_num_seqs']} | {e['kv_cache_groups']} | "
                f"{e['block_size']} | {cached} | {r['child_seconds']:.0f} |"
            )
        for name in ("online_stock", "online_vtw"):
            if name in res:
                e = res[name]["engine"]
                cached = sum(v["cached_tokens"] for v in res[name]["per_k"].values())
                lines.append(
                    f"| {name} (vllm serve) | {e['enable_prefix_caching']} | "
                    f"{e['enforce_eager']} | | | | | | | | {cached:.0f} | "
                    f"{res[name]['child_seconds']:.0f} |"
                )
        lines.append("")
    lines += [
        "KV layer-blocks: blocks held after prefill x layers per block (a stock block spans "
        "all layers, a VTW block its layer group), so the column compares KV memory. "
        "FLOPs bound: stock/VTW prefill FLOPs of the language model (benchmarks/flops.py). "
        "Decode ms/step: the median duration of the batch's decode steps (``engine.step()`` "
        "after every request has its first token) in each repeat, robust to short bursts of "
        "load on the machine.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Per model: VTW/stock ratios per K (defaults solid, eager dashed); decode ms/step
    against the number of KV groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in args.models if "stock" in results[k] or "stock_eager" in results[k]]
    if not kinds:
        return
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10, 3.5 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds, strict=True):
        res = results[kind]
        for stock_name, vtw_name, style in (
            ("stock", "vtw", "-"),
            ("stock_eager", "vtw_eager", "--"),
        ):
            if vtw_name not in res:
                continue
            stock = res[stock_name]["per_k"]["None"]
            per_k = res[vtw_name]["per_k"]
            ks = [int(k) for k in per_k]
            for key, label, color in (
                ("prefill_tok_s", "prefill", "tab:blue"),
                ("decode_tok_s", "decode", "tab:orange"),
            ):
                ratios = [over(per_k[str(k)][key], stock[key]) for k in ks]
                row[0].plot(
                    ks, ratios, style, color=color, marker="o", label=f"{label}, {vtw_name}"
                )
        row[0].axhline(1.0, color="grey", linewidth=0.8)
        row[0].set_xlabel("K (layers that see the vision tokens)")
        row[0].set_ylabel("x stock")
        row[0].set_title(f"{kind}: VTW / stock (solid: defaults, dashed: eager)")
        row[0].legend(fontsize=7)
        if "vtw_1group" in res:
            groups.plot(row[1], kind, res)
        else:
            row[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llava"], choices=["llava", "llava_next"])
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="default: all four")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 repeat, short runs, no online part"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6], help="eager VTW's Ks")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--kv-mib", type=int, default=128)
    parser.add_argument("--kv-bound-requests", type=int, default=48)
    parser.add_argument("--kv-bound-tokens", type=int, default=16)
    parser.add_argument("--online-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--online-tokens", type=int, default=16)
    parser.add_argument(
        "--online-text-tokens", type=int, default=12, help="random text tokens per request"
    )
    parser.add_argument("--no-online", action="store_true", help="same as leaving out 'online'")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="every engine, offline and online"
    )
    parser.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="the online servers only (vLLM "
        "runs data parallelism for dense models through vllm serve, not LLM)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.decode_tokens, args.kv_bound_requests = 1, 16, 16
        args.parts = args.parts or ["defaults", "groups", "eager"]
    parts = [p for p in (args.parts or PARTS) if not (p == "online" and args.no_online)]
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/flops.py
    meta = run_meta("benchmarks/serving/run.py")
    meta["parts"] = parts
    meta["tensor_parallel_size"] = args.tensor_parallel_size
    meta["data_parallel_size"] = args.data_parallel_size
    ranks = args.tensor_parallel_size * args.data_parallel_size
    if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM's CPU build binds each rank to a NUMA node's cores; one node here: by hand,
        # one core per rank in turn (engines that take turns share the cores).
        cores = os.cpu_count() or 1
        bind = "|".join(str(i % cores) for i in range(ranks))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        meta["cpu_threads_bind"] = bind
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for kind in args.models:
        bench_checkpoint(kind)
        results[kind] = {}
        names = [n for n, needed_by in ENGINE_PARTS.items() if any(p in parts for p in needed_by)]
        at_defaults = [n for n in names if not engine_spec(n, 2, []).get("eager")]
        for group in (at_defaults, [n for n in names if n not in at_defaults]):
            if group:  # none: online only
                results[kind] |= offline_engines(kind, group, args)
        if "online" in parts:
            for name in ("stock", "vtw"):
                results[kind][f"online_{name}"] = online.measure(kind, name, args)
    results["bars"] = defaults.bars(results)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = round(time.perf_counter() - started)
    text = report(results, args, meta)
    (args.out / "serving.md").write_text(text)
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    plot(results, args, args.out / "serving.png")
    print(text)


if __name__ == "__main__":
    main()
