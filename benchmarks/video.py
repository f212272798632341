"""LLaVA-NeXT-Video: stock vLLM vs VTW, both at vLLM's defaults, in one run.

    python benchmarks/video.py [--frames 16] [--batch 4] [--repeats 9] [--kv-mib 160]

A LLaVA-NeXT-Video-shaped benchmark checkpoint built here (random weights: the answers mean
nothing, the cost is real): the tiny fixture's CLIP tower, pooling (144 tokens per frame)
and processors with an 8-layer, 512-wide Llama, so that the language model dominates. A
request is one video of ``--frames`` frames (16: 2304 video tokens) and a short question.

Two engines, each in its own child process (in-process engine core, so the scheduler is
readable), side by side and taking turns batch by batch (``benchmarks/serving/common.py``'s
``interleaved``, so the machine's drift hits both alike): stock and VTW with
``vtw_allowed_k`` [N/2, N] (two KV groups), measured at K = N/2 and K = N (per-request
``extra_args``). Both at vLLM's defaults: neither ``enforce_eager`` nor
``enable_prefix_caching`` is passed (what each engine ran with is read back and
reported); only the KV budget, context length, dtype and ``limit_mm_per_prompt`` are
set, the same for both. Every request carries a video its engine has never seen (a fresh
seed per request, warm-up and repeats included), so the prefix cache cannot hit; the
cached tokens the engines report must be 0.

Per K: prefill throughput (prompt tokens/s of a batch, timed until every request has its
first token), decode throughput (the same batch after that, ``ignore_eos``), the KV
blocks one request holds per KV group after its prefill (x layers per group: KV memory),
and, at the fixed KV budget, how many such requests fit at once (the engine's block pool
over the blocks one request holds) and the requests/s of ``--kv-bound-requests`` requests.
(The scheduler's "running" count is not that: with chunked prefill it admits requests
whose prompts are not computed yet, and preempts them when blocks run out.) Videos are
preprocessed in ``add_request``, before the clock starts. Bars: KV per request <= 0.55x
stock and prefill >= 1.8x stock at K = N/2. About 5 minutes on 2 CPU cores; timings need
an otherwise idle machine. ``--render JSON`` rewrites the markdown of a recorded run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PROMPT = "USER: <video>\nWhat happens in the video? Describe it. ASSISTANT:"
TOKENS_PER_FRAME = 144  # 24 x 24 CLIP-336 patches, average-pooled with stride 2
MAX_MODEL_LEN = 4096  # the checkpoint's context (LLaVA-NeXT-Video-7B's too)
BARS = (("kv_layer_blocks", "<=", 0.55), ("prefill_tok_s", ">=", 1.8))  # at K = N/2


def _load(name: str, path: Path) -> Any:
    """A sibling benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


serving = _load("serving_common", REPO / "benchmarks" / "serving" / "common.py")  # shared helpers
flops = _load("flops", REPO / "benchmarks" / "flops.py")


def video_checkpoint() -> Path:
    """The benchmark-sized LLaVA-NeXT-Video checkpoint (cached next to the fixtures)."""
    import torch
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    from vtw_vllm.testing import default_cache_dir, fixtures

    out = default_cache_dir() / flops.VIDEO_BENCH_CHECKPOINT
    if (out / "config.json").is_file():
        return out
    tokenizer = fixtures._video_tokenizer()
    common = fixtures._common_config(tokenizer)
    text = common["text_config"]  # as benchmarks/serving/common.py's image checkpoints
    text.hidden_size, text.intermediate_size = 512, 1408
    text.num_attention_heads, text.num_key_value_heads = 8, 4
    text.initializer_range = 0.02
    size = fixtures._IMAGE_SIZE
    config = LlavaNextVideoConfig(
        **common,
        image_grid_pinpoints=fixtures._GRID_PINPOINTS,
        video_token_index=tokenizer.convert_tokens_to_ids(fixtures.VIDEO_TOKEN),
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        image_seq_length=576,
        video_seq_length=144,
    )
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        image_processor=LlavaNextImageProcessor(
            **fixtures._image_processor_kwargs(), image_grid_pinpoints=fixtures._GRID_PINPOINTS
        ),
        tokenizer=tokenizer,
        **fixtures._processor_kwargs() | {"chat_template": fixtures.VIDEO_CHAT_TEMPLATE},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaNextVideoForConditionalGeneration(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    fixtures._save(model, processor, tmp)
    tmp.rename(out)
    return out


def engine_spec(name: str, n: int) -> dict[str, Any]:
    """Stock, or VTW with two KV groups (K = N/2 and N allowed), and the K it measures."""
    if name == "stock":
        return {"arch": "LlavaNextVideoForConditionalGeneration", "layout": {}, "ks": [None]}
    return {
        "arch": "LlavaNextVideoVTWForConditionalGeneration",
        "layout": {"vtw_k": n // 2, "vtw_allowed_k": [n // 2, n]},
        "ks": [n // 2, n],
    }


def offline(name: str, arg_dict: dict[str, Any]) -> dict[str, Any]:
    """One engine (a child process, :mod:`vtw_vllm.child_engine`): every measurement for
    every K it serves (``benchmarks/serving/common.py``'s ``measure_engine``)."""
    from vllm import LLM

    from vtw_vllm import child_engine

    child_engine.in_process_engine_core()  # the scheduler lives in this process
    args = argparse.Namespace(**arg_dict)

    model = video_checkpoint()
    n = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    spec = engine_spec(name, n)
    llm = LLM(
        model=str(model),
        hf_overrides={"architectures": [spec["arch"]], **spec["layout"]},
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        limit_mm_per_prompt={"video": 1},
        seed=0,
    )
    videos = serving.FreshVideos(args.frames)

    def prompts(count: int) -> list[dict[str, Any]]:
        return [{"prompt": PROMPT, "multi_modal_data": {"video": v}} for v in videos.take(count)]

    return {
        "name": name,
        "spec": spec,
        "engine": serving.engine_settings(llm),
        "num_layers": n,
        **serving.measure_engine(llm, spec["ks"], prompts, args),
    }


def bars(stock: dict[str, Any], vtw: dict[str, Any]) -> list[dict[str, Any]]:
    k = vtw["num_layers"] // 2
    return [serving.check_bar(stock, vtw, k, *bar) for bar in BARS]


def report(results: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    stock, vtw = results["stock"], results["vtw"]
    tokens = stock["prompt_tokens_per_request"]
    video_tokens = args.frames * TOKENS_PER_FRAME
    shape = flops.Shape.from_checkpoint(video_checkpoint())
    tower = flops.Tower.from_checkpoint(video_checkpoint())
    text_tokens = tokens - video_tokens

    def bound(k: int) -> str:
        lm = 1 / flops.ratio(shape, video_tokens, text_tokens, k)
        whole = flops.whole_ratio(shape, tower, args.frames, TOKENS_PER_FRAME, text_tokens, k)
        return f"{lm:.2f}x / {1 / whole:.2f}x"

    lines = [
        "# Video benchmark: stock vLLM vs VTW on LLaVA-NeXT-Video, both at vLLM's defaults",
        "",
        serving.meta_line(meta),
        "",
        f"Benchmark checkpoint: LLaVA-NeXT-Video-shaped, {vtw['num_layers']}-layer Llama, "
        f"hidden {shape.hidden} (random weights). One video of {args.frames} frames per "
        f"request: {tokens} prompt tokens, {video_tokens} of them video. {args.batch} "
        f"requests per batch, each with a video its engine has not seen, {args.repeats} "
        f"repeats, decode {args.decode_tokens} tokens; KV budget {args.kv_mib} MiB for both; "
        f"KV-bound: {args.kv_bound_requests} requests x {args.kv_bound_tokens} tokens at "
        "that budget. Figures: median [min-max] over the repeats; ratios: VTW / stock of "
        f"the same run. VTW: vtw_allowed_k {vtw['engine']['allowed_k']} "
        f"({vtw['engine']['kv_cache_groups']} KV groups).",
        "",
    ]
    pools = (stock["engine"]["num_blocks"], vtw["engine"]["num_blocks"])
    lines += serving.budget_table(stock, vtw, pools, bound)
    lines += ["", f"Bars (K = {vtw['num_layers'] // 2} = N/2, both at defaults):", ""]
    for b in results["bars"]:
        what = "KV per request" if b["metric"] == "kv_layer_blocks" else "prefill"
        verdict = "PASS" if b["pass"] else "FAIL"
        lines.append(f"- {verdict}: {what} {b['ratio']:.2f}x stock (bar {b['op']} {b['bar']}x)")
    engines = [
        (
            name,
            r["engine"],
            sum(v["cached_tokens"] for v in r["per_k"].values()),
            r["child_seconds"],
        )
        for name, r in (("stock", stock), ("vtw", vtw))
    ]
    lines += ["", *serving.engines_table(engines)]
    lines += [
        "",
        "KV layer-blocks: blocks held after prefill x layers per block (a stock block spans "
        "all layers, a VTW block its KV group's), so the column compares KV memory. FLOPs "
        "bound: stock / VTW prefill FLOPs (benchmarks/flops.py) of the language model, and "
        "of all of it, the vision tower and projector (the same in both engines) included.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="frames per video (144 tokens)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--kv-mib", type=int, default=160)
    parser.add_argument("--kv-bound-requests", type=int, default=12)
    parser.add_argument("--kv-bound-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="rewrite the markdown of an earlier run"
    )
    args = parser.parse_args()
    if args.render:  # no engine: the report of the figures recorded in JSON
        saved = json.loads(args.render.read_text())
        run_args = argparse.Namespace(**saved["args"])
        results = {name: saved[name] for name in ("stock", "vtw", "bars")}
        path = args.render.with_suffix(".md")
        path.write_text(report(results, run_args, saved["meta"]))
        print(path.read_text())
        return
    if not 1 <= args.frames <= (MAX_MODEL_LEN - 128) // TOKENS_PER_FRAME:
        parser.error(f"--frames: 1 to {(MAX_MODEL_LEN - 128) // TOKENS_PER_FRAME} fit the context")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = serving.run_meta("benchmarks/video.py")
    started = time.perf_counter()
    video_checkpoint()
    print("[video bench] stock and vtw (interleaved) ...", flush=True)
    target = f"{Path(__file__).resolve()}:offline"
    results: dict[str, Any] = serving.interleaved(
        {name: (target, [name, vars(args) | {"out": str(args.out)}]) for name in ("stock", "vtw")}
    )
    results["bars"] = bars(results["stock"], results["vtw"])
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = round(time.perf_counter() - started)
    text = report(results, args, meta)
    (args.out / "video.md").write_text(text)
    args_json = vars(args) | {"out": str(args.out)}
    (args.out / "video.json").write_text(
        json.dumps({"meta": meta, "args": args_json, **results}, indent=1)
    )
    print(text)


if __name__ == "__main__":
    main()
