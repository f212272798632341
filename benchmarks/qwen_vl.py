"""Qwen2.5-VL: stock vLLM vs VTW, both at vLLM's defaults, in one run: images and videos.

    python benchmarks/qwen_vl.py [--frames 16] [--batch 4] [--repeats 9] [--kv-mib 160]

A Qwen2.5-VL-shaped benchmark checkpoint built here (``benchmarks/serving/common.py``'s
``bench_checkpoint("qwen2_5_vl")``; random weights: the answers mean nothing, the cost
is real): the tiny fixture's tokenizer, processors and vision tower (14 px patches,
2 x 2 merged, frames in pairs, windowed attention) with an 8-layer, 512-wide language
model, as the LLaVA benchmark checkpoints, so that the language model dominates the
FLOPs (not necessarily the time: the report gives the vision encoder's share). Two
kinds of request, each in Qwen's chat format with a short question: one 448 x 448
image (256 image tokens), and one video of ``--frames`` 448 x 448 frames (16: 8 frame
pairs, 2048 video tokens).

Two engines, each in its own child process (in-process engine core, so the scheduler is
readable), side by side and taking turns batch by batch (``common.py``'s
``interleaved``, so the machine's drift hits both alike): stock and VTW with
``vtw_allowed_k`` [N/2, N] (two KV groups), measured at K = N/2 and K = N (per-request
``extra_args``). Both at vLLM's defaults, as in ``benchmarks/video.py``: neither
``enforce_eager`` nor ``enable_prefix_caching`` is passed (what each engine ran with is
read back and reported); only the KV budget, context length, dtype and
``limit_mm_per_prompt`` are set, the same for both (``--block-size`` sets the block
size too, for a run off the defaults). Each engine measures the image requests, then
the video requests, with ``common.py``'s ``measure_engine``; every request carries an
image or video its engine has never seen, so the prefix cache cannot hit (the cached
tokens the engines report must be 0).

Per request kind and K: prefill throughput, decode throughput, the KV blocks one request
holds per KV group after its prefill (x layers per group: KV memory), how many such
requests fit the KV budget at once and the requests/s of many requests at that budget
(``--image-kv-bound-requests`` / ``--video-kv-bound-requests``); and the time each engine
spends in the vision encoder (the same work in both), per request. Bars (the issue's): at
K = N/2, KV per image request <= 0.56x stock and video prefill >= 1.7x stock; at K = N,
prefill and decode >= 0.95x stock for both kinds. About 8 minutes on 2 CPU cores with
the defaults (estimated); timings need an otherwise idle machine. ``--render JSON``
rewrites the markdown of a recorded run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "benchmarks" / "serving")]
import common as serving  # noqa: E402  benchmarks/serving/common.py: the shared helpers
import flops  # noqa: E402  benchmarks/flops.py

RESULTS = REPO / "benchmarks" / "results"
KIND = "qwen2_5_vl"
SIZE = 448  # image and frame side: 32 x 32 patches, 256 LM tokens per image / frame pair
MAX_MODEL_LEN = 4096
PROMPTS = {
    "image": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "What is in the picture? Describe it.<|im_end|>\n<|im_start|>assistant\n",
    "video": "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
    "What happens in the video? Describe it.<|im_end|>\n<|im_start|>assistant\n",
}
WORKLOADS = tuple(PROMPTS)
# (request kind, K: "half" = N/2 or "n" = N, metric, op, bar): the bars.
BARS = (
    ("image", "half", "kv_layer_blocks", "<=", 0.56),
    ("video", "half", "prefill_tok_s", ">=", 1.7),
    *((w, "n", m, ">=", 0.95) for w in WORKLOADS for m in ("prefill_tok_s", "decode_tok_s")),
)
METRIC_NAMES = {
    "kv_layer_blocks": "KV per request",
    "prefill_tok_s": "prefill",
    "decode_tok_s": "decode",
}


def frame_pairs(frames: int) -> int:
    """Qwen's tower takes frames in pairs (an odd last frame is doubled)."""
    return math.ceil(frames / 2)


def workload_args(args: argparse.Namespace, workload: str) -> argparse.Namespace:
    """The options ``measure_engine`` reads, with this request kind's KV-bound count."""
    count = getattr(args, f"{workload}_kv_bound_requests")
    return argparse.Namespace(**(vars(args) | {"kv_bound_requests": count}))


class EncoderClock:
    """Times each call of Qwen2.5-VL's vision encoder (tower and merger: the same work in
    stock and VTW) in this process, with the images or videos it encoded."""

    def __init__(self) -> None:
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

        self.calls: list[tuple[float, int]] = []
        inner = Qwen2_5_VLForConditionalGeneration.embed_multimodal  # VTW's class inherits it

        def timed(model: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = inner(model, **kwargs)
            self.calls.append((time.perf_counter() - start, len(out)))
            return out

        Qwen2_5_VLForConditionalGeneration.embed_multimodal = timed

    def take(self) -> dict[str, Any]:
        """The calls since the last take: items, seconds, and the median seconds per item
        (a call's first-time compilation does not move it)."""
        calls, self.calls = self.calls, []
        return {
            "items": sum(n for _, n in calls),
            "seconds": sum(t for t, _ in calls),
            "median_s_per_item": statistics.median([t / n for t, n in calls if n] or [math.nan]),
        }


def offline(name: str, arg_dict: dict[str, Any]) -> dict[str, Any]:
    """One engine (a child process, :mod:`vtw_vllm.child_engine`): every measurement of
    both request kinds for every K it serves (``common.py``'s ``measure_engine``)."""
    from vllm import LLM

    from vtw_vllm import child_engine
    from vtw_vllm.testing.qwen_fixtures import video_metadata

    child_engine.in_process_engine_core()  # the scheduler lives in this process
    args = argparse.Namespace(**arg_dict)
    n = serving.num_layers(KIND)
    spec = serving.engine_spec(name, n, [])
    clock = EncoderClock()
    llm = LLM(
        model=str(serving.bench_checkpoint(KIND)),
        hf_overrides=serving.hf_overrides(KIND, spec),
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        limit_mm_per_prompt={"image": 1, "video": 1},
        seed=0,
        **({"block_size": args.block_size} if args.block_size else {}),
    )
    images = serving.FreshImages(KIND, size=(SIZE, SIZE))
    videos = serving.FreshVideos(args.frames, size=(SIZE, SIZE))
    metadata = video_metadata(args.frames)

    def prompts(workload: str, count: int) -> list[dict[str, Any]]:
        if workload == "image":
            media = [{"image": im} for im in images.take(count)]
        else:
            media = [{"video": (v, metadata)} for v in videos.take(count)]
        return [{"prompt": PROMPTS[workload], "multi_modal_data": m} for m in media]

    result = {"name": name, "spec": spec, "engine": serving.engine_settings(llm), "num_layers": n}
    clock.take()  # not the start-up's profiling runs
    for w in WORKLOADS:
        result[w] = serving.measure_engine(
            llm, spec["ks"], lambda count, w=w: prompts(w, count), workload_args(args, w)
        )
        result[w]["encoder"] = clock.take()  # every call for this kind, warm-up included
    return result


def bars(stock: dict[str, Any], vtw: dict[str, Any]) -> list[dict[str, Any]]:
    n = vtw["num_layers"]
    out = []
    for workload, which, metric, op, bar in BARS:
        k = n // 2 if which == "half" else n
        out.append(serving.check_bar(stock[workload], vtw[workload], k, metric, op, bar))
        out[-1]["workload"] = workload
    return out


def report(results: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    stock, vtw = results["stock"], results["vtw"]
    n = vtw["num_layers"]
    model = serving.bench_checkpoint(KIND)
    shape = flops.Shape.from_checkpoint(model)
    tower = flops.Tower.from_checkpoint(model, image_size=SIZE)
    counts = {"image": 1, "video": frame_pairs(args.frames)}
    lines = [
        "# Qwen2.5-VL benchmark: stock vLLM vs VTW, both at vLLM's defaults",
        "",
        serving.meta_line(meta),
        "",
        f"Benchmark checkpoint: Qwen2.5-VL-shaped, {n}-layer Qwen2 language model, hidden "
        f"{shape.hidden} (random weights), the tiny fixture's vision tower ({tower.num_layers} "
        f"blocks, hidden {tower.hidden}). Requests: one {SIZE} x {SIZE} image, or one video "
        f"of {args.frames} {SIZE} x {SIZE} frames, and a short question. {args.batch} "
        f"requests per batch, each with media its engine has not seen, {args.repeats} "
        f"repeats, decode {args.decode_tokens} tokens; KV budget {args.kv_mib} MiB for both; "
        f"KV-bound: {args.image_kv_bound_requests} image or {args.video_kv_bound_requests} "
        f"video requests x {args.kv_bound_tokens} tokens at that budget. Figures: median "
        "[min-max] over the repeats; ratios: VTW / stock of the same run. VTW: "
        f"vtw_allowed_k {vtw['engine']['allowed_k']} "
        f"({vtw['engine']['kv_cache_groups']} KV groups)."
        + (f" Block size {args.block_size}: set, not vLLM's default." if args.block_size else ""),
    ]
    engines = (("stock", stock), ("vtw", vtw))
    pools = (stock["engine"]["num_blocks"], vtw["engine"]["num_blocks"])
    for w in WORKLOADS:
        tokens = stock[w]["prompt_tokens_per_request"]
        vision = counts[w] * tower.tokens
        text = tokens - vision

        def bound(k: int, w: str = w, vision: int = vision, text: int = text) -> str:
            lm = 1 / flops.ratio(shape, vision, text, k)
            whole = 1 / flops.whole_ratio(shape, tower, counts[w], tower.tokens, text, k)
            return f"{lm:.2f}x / {whole:.2f}x"

        what = "image" if w == "image" else f"video ({args.frames} frames)"
        encoder = {e: r[w]["encoder"]["median_s_per_item"] for e, r in engines}
        prefill = tokens / stock[w]["per_k"]["None"]["prefill_tok_s"]["median"]  # s per request
        share = encoder["stock"] / prefill
        lm = flops.ratio(shape, vision, text, n // 2)
        lines += [
            "",
            f"## {w.capitalize()} requests: {tokens} prompt tokens, {vision} of them {what}",
            "",
            *serving.budget_table(stock[w], vtw[w], pools, bound),
            "",
            f"- Vision encoder (tower and merger, the same work in both engines; median over "
            f"its calls): {1e3 * encoder['stock']:.0f} ms per request in "
            f"stock, {1e3 * encoder['vtw']:.0f} ms in VTW, {share:.0%} of stock's prefill "
            f"time per request ({1e3 * prefill:.0f} ms). If the rest shrank as the language "
            f"model's FLOPs, VTW K={n // 2} prefill would be "
            f"{1 / (share + (1 - share) * lm):.2f}x stock.",
            f"- KV token-layers written per request (what a block size of 1 would hold), "
            f"VTW K={n // 2} / stock: {(vision * (n // 2) + text * n) / (tokens * n):.2f}x.",
        ]
    off = f", block size {args.block_size}" if args.block_size else ""
    lines += ["", f"Bars (N = {n}, both at defaults{off}):", ""]
    for b in results["bars"]:
        verdict = "PASS" if b["pass"] else "FAIL"
        lines.append(
            f"- {verdict}: {b['workload']} requests, K = {b['k']}: {METRIC_NAMES[b['metric']]} "
            f"{b['ratio']:.2f}x stock (bar {b['op']} {b['bar']}x)"
        )
    rows = [
        (
            name,
            r["engine"],
            sum(v["cached_tokens"] for w in WORKLOADS for v in r[w]["per_k"].values()),
            r["child_seconds"],
        )
        for name, r in engines
    ]
    lines += [
        "",
        *serving.engines_table(rows),
        "",
        "KV layer-blocks: blocks held after prefill x layers per block (a stock block spans "
        "all layers, a VTW block its KV group's), so the column compares KV memory; a "
        "request's text-only group still takes whole blocks. FLOPs bound: stock / VTW "
        "prefill FLOPs (benchmarks/flops.py) of the language model, and of all of it, the "
        "vision tower and merger (the same in both engines) included.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="frames per video (2: 256 tokens)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--decode-tokens", type=int, default=32)
    # 160 MiB at the CPU default (fp32, blocks of 128 tokens: 2 MiB): stock holds the timed
    # batch of 4 videos (17 blocks each) and 26 image requests, VTW at K = N/2 8 and 40.
    parser.add_argument("--kv-mib", type=int, default=160)
    parser.add_argument("--image-kv-bound-requests", type=int, default=40)
    parser.add_argument("--video-kv-bound-requests", type=int, default=12)
    parser.add_argument("--kv-bound-tokens", type=int, default=16)
    parser.add_argument(
        "--block-size", type=int, help="KV block size (default: vLLM's, not passed)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="rewrite the markdown of an earlier run"
    )
    args = parser.parse_args()
    if args.render:  # no engine: the report of the figures recorded in JSON
        saved = json.loads(args.render.read_text())
        results = {name: saved[name] for name in ("stock", "vtw", "bars")}
        path = args.render.with_suffix(".md")
        path.write_text(report(results, argparse.Namespace(**saved["args"]), saved["meta"]))
        print(path.read_text())
        return
    most = (MAX_MODEL_LEN - 128) // 256 * 2
    if not 1 <= args.frames <= most:
        parser.error(f"--frames: 1 to {most} fit the context")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = serving.run_meta("benchmarks/qwen_vl.py")
    started = time.perf_counter()
    serving.bench_checkpoint(KIND)
    print("[qwen_vl bench] stock and vtw (interleaved) ...", flush=True)
    target = f"{Path(__file__).resolve()}:offline"
    options = vars(args) | {"out": str(args.out), "render": None}
    results: dict[str, Any] = serving.interleaved(
        {name: (target, [name, options]) for name in ("stock", "vtw")}
    )
    results["bars"] = bars(results["stock"], results["vtw"])
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = round(time.perf_counter() - started)
    text = report(results, args, meta)
    (args.out / "qwen_vl.md").write_text(text)
    (args.out / "qwen_vl.json").write_text(
        json.dumps({"meta": meta, "args": options, **results}, indent=1)
    )
    print(text)


if __name__ == "__main__":
    main()
