"""What the parts of the serving benchmark (``run.py``) share, and ``benchmarks/video.py``
and ``benchmarks/multiturn.py`` with them: the benchmark checkpoint, the engines, the
offline measurement, the child engines and their interleaving, statistics, run metadata
and the report's formatting.

Offline, per K: prefill throughput (prompt tokens/s of a batch of image requests, timed
until each has its first token), decode throughput and ms per decode step (the same batch
after that, ``ignore_eos``), requests/s and peak concurrency when KV-bound (many requests,
a small KV budget) and KV blocks per request (read from the scheduler). The scheduler
limits (``max_num_batched_tokens``, ``max_num_seqs``) are the engine's defaults too.

Prefix caching: every request sent to an engine, warm-up and repeats included, carries an
image that engine has never seen (a fresh image seed per request; online, a fresh
``--seed`` per ``vllm bench serve`` round, from which random-mm draws every image), so
stock's prefix cache cannot hit across timed requests; the cached tokens the engine
reports for the timed requests (``RequestOutput.num_cached_tokens``; online, the server's
``vllm:prefix_cache_hits`` counter) are recorded and must be 0. Images are preprocessed in
``add_request``, before the clock starts.

Each offline engine runs in its own child process (``vtw_vllm.child_engine``: in-process
engine core, so the scheduler is readable); the engines of a part run side by side and
take turns batch by batch (:func:`interleaved`), and each engine alternates its K
values. The child loads this file (``common.py:offline_child``), so it imports no sibling
module at its top.

The checkpoint is a benchmark-sized variant of the tiny fixture (same tokenizer, tower
and image processor; a 512-wide, 8-layer llama), so that, as in a real LLaVA, the
language model and not the vision tower dominates prefill (Qwen2.5-VL, for
``benchmarks/qwen_vl.py``: its fixture, widened the same way). Random weights: the
answers are meaningless, the cost is not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vtw_vllm.child_engine import (
    MARKER,
    child_command,
    held_blocks,
    in_process_engine_core,
    scheduler,
)

REPO = Path(__file__).resolve().parents[2]
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
    if kind not in ("llava", "llava_next"):  # e.g. qwen2_5_vl: the fixture, widened
        return _widened_fixture(kind, out)
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


def _widened_fixture(kind: str, out: Path) -> Path:
    """The tiny fixture ``kind`` (its tokenizer, processor, vision tower and depth) with
    its language model widened as in the LLaVA benchmark checkpoints (hidden 512, FFN
    1408, 8 heads / 4 KV heads; M-RoPE sections scaled to the new head size) and the
    vision merger's output widened to match; random weights from the fixture's seed (0)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from vtw_vllm.testing import fixtures, get_fixture

    fixture = get_fixture(kind)
    config = AutoConfig.from_pretrained(fixture)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    text.hidden_size, text.intermediate_size = 512, 1408
    text.num_attention_heads, text.num_key_value_heads = 8, 4
    if getattr(text, "head_dim", None):  # set explicitly (Qwen3-VL)
        text.head_dim = 512 // 8
    text.initializer_range = 0.02
    rope = text.rope_parameters or {}
    if "mrope_section" in rope:  # (t, h, w) rotary pairs, summing to head_dim / 2
        scale = 512 // 8 // head_dim
        rope["mrope_section"] = [s * scale for s in rope["mrope_section"]]
    config.vision_config.out_hidden_size = 512
    model = fixtures._init_model(getattr(transformers, config.architectures[0]), config, seed=0)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoProcessor.from_pretrained(fixture).save_pretrained(tmp)
    tmp.rename(out)
    return out


def num_layers(kind: str) -> int:
    config = json.loads((bench_checkpoint(kind) / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"]


def engine_spec(name: str, n: int, eager_ks: list[int]) -> dict[str, Any]:
    """What one engine is: VTW or not, eager or defaults, its KV layout, the K it measures."""
    half = n // 2
    specs: dict[str, dict[str, Any]] = {
        "stock": {"vtw": False, "eager": False, "layout": {}, "ks": [None], "kv_bound": True},
        "vtw": {
            "vtw": True,
            "eager": False,
            "layout": {"vtw_k": half, "vtw_allowed_k": [half, n]},
            "ks": [half, n],
            "kv_bound": True,
        },
        "vtw_1group": {
            "vtw": True,
            "eager": False,
            "layout": {"vtw_allowed_k": [n]},
            "ks": [n],
            "kv_bound": False,
        },
        "vtw_group_size2": {
            "vtw": True,
            "eager": False,
            "layout": {"vtw_layer_group_size": 2},
            "ks": [n],
            "kv_bound": False,
        },
        "stock_eager": {"vtw": False, "eager": True, "layout": {}, "ks": [None], "kv_bound": True},
        "vtw_eager": {
            "vtw": True,
            "eager": True,
            "layout": {"vtw_layer_group_size": 2},
            "ks": sorted({*(k for k in eager_ks if k < n and k % 2 == 0), n}),
            "kv_bound": True,
        },
    }
    return specs[name]


FAMILIES = {"llava": "Llava", "llava_next": "LlavaNext", "qwen2_5_vl": "Qwen2_5_VL"}


def hf_overrides(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    arch = f"{FAMILIES[kind]}{'VTW' if spec['vtw'] else ''}ForConditionalGeneration"
    return {"architectures": [arch], **spec["layout"]}


class FreshImages:
    """Test images, each seed used once: no two requests to an engine share an image."""

    def __init__(
        self, kind: str, first_seed: int = 1000, size: tuple[int, int] | None = None
    ) -> None:
        self.size = size or ((336, 336) if kind == "llava" else (448, 336))  # NeXT: 2 tiles
        self.next_seed = first_seed

    def take(self, n: int) -> list:
        from vtw_vllm.testing import make_test_image

        seeds = range(self.next_seed, self.next_seed + n)
        self.next_seed += n
        return [make_test_image(seed, size=self.size) for seed in seeds]


class FreshVideos:
    """Test videos, each seed used once: no two requests to an engine share a video."""

    def __init__(
        self, frames: int, first_seed: int = 5000, size: tuple[int, int] = (336, 336)
    ) -> None:
        self.frames, self.next_seed, self.size = frames, first_seed, size

    def take(self, n: int) -> list:
        from vtw_vllm.testing import make_test_video

        seeds = range(self.next_seed, self.next_seed + n)
        self.next_seed += n
        return [make_test_video(s, num_frames=self.frames, size=self.size) for s in seeds]


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min and max of the repeats, and every repeat in the order it ran."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def engine_settings(llm: Any) -> dict[str, Any]:
    """What the engine actually runs with (after vLLM's and the plugin's config hooks)."""
    config = llm.llm_engine.vllm_config
    sched = scheduler(llm)
    compilation = config.compilation_config
    return {
        "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "enforce_eager": bool(config.model_config.enforce_eager),
        "compilation_mode": getattr(compilation.mode, "name", str(compilation.mode)),
        "cudagraph_mode": getattr(compilation.cudagraph_mode, "name", "None"),
        "async_scheduling": bool(config.scheduler_config.async_scheduling),
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "kv_cache_groups": len(sched.kv_cache_config.kv_cache_groups),
        "block_size": sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
        "num_blocks": sched.kv_cache_config.num_blocks,
        "allowed_k": getattr(config.model_config.hf_config, "vtw_allowed_k", None),
    }


def offline(kind: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One engine (child process): every measurement for every K it serves."""
    in_process_engine_core()  # the scheduler lives in this process
    from vllm import LLM

    eager = {"enforce_eager": True, "enable_prefix_caching": False} if spec["eager"] else {}
    llm = LLM(
        model=str(bench_checkpoint(kind)),
        hf_overrides=hf_overrides(kind, spec),
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        max_model_len=4096,
        dtype="float32",
        seed=0,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        **eager,
    )
    images = FreshImages(kind)

    def prompts(n: int) -> list[dict[str, Any]]:
        return [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images.take(n)]

    return {
        "kind": kind,
        "spec": spec,
        "overrides": hf_overrides(kind, spec),
        "engine": engine_settings(llm),
        "num_layers": llm.llm_engine.vllm_config.model_config.hf_text_config.num_hidden_layers,
        **measure_engine(llm, spec["ks"], prompts, args, kv_bound=spec["kv_bound"]),
    }


def measure_engine(
    llm: Any,
    ks: list[int | None],
    prompts: Callable[[int], list[dict[str, Any]]],
    args: argparse.Namespace,
    kv_bound: bool = True,
) -> dict[str, Any]:
    """Every offline measurement of one engine for every K it serves (shared with
    ``benchmarks/video.py``). ``prompts(n)`` gives n requests, each with media the engine
    has not seen. Per K: a warm-up batch, then ``args.repeats`` timed batches of
    ``args.batch`` requests (the Ks alternate, and in an interleaved run each batch waits
    for its turn), and with ``kv_bound`` the KV-bound run and the blocks one request
    holds."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sched = scheduler(llm)
    layers_per_group = [len(g.layer_names) for g in sched.kv_cache_config.kv_cache_groups]

    def params(k: int | None, max_tokens: int) -> SamplingParams:
        extra = {"vtw_k": k} if k is not None else None
        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
        )

    def run_batch(k: int | None, max_tokens: int, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Add the batch (preprocessing its media), then time the engine steps: prefill
        until every request has its first token, decode after that."""
        tag = f"t{time.perf_counter_ns()}"
        for i, prompt in enumerate(batch):
            engine.add_request(f"{tag}x{i}", prompt, params(k, max_tokens))
        start = time.perf_counter()
        prefilled: float | None = None
        generated_at_prefill = running_at_prefill = peak = 0
        finished = []
        step_ms: list[float] = []  # each decode step's duration
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            finished += [out for out in engine.step() if out.finished]
            peak = max(peak, len(sched.running))
            if prefilled is not None:
                step_ms.append(1e3 * (time.perf_counter() - step_start))
            elif all(r.num_output_tokens >= 1 for r in sched.requests.values()):
                prefilled = time.perf_counter()
                running_at_prefill = len(sched.running)
                generated_at_prefill = sum(r.num_output_tokens for r in sched.requests.values())
        end = time.perf_counter()
        prefilled = prefilled or end
        return {
            "seconds": end - start,
            "prefill_s": prefilled - start,
            "decode_s": end - prefilled,
            "decode_step_ms": statistics.median(step_ms) if step_ms else float("nan"),
            "decode_tokens": len(batch) * max_tokens - generated_at_prefill,
            "running_at_prefill": running_at_prefill,
            "peak_running": peak,
            "prompt_tokens": sum(len(out.prompt_token_ids) for out in finished),
            "cached_tokens": sum(out.num_cached_tokens or 0 for out in finished),
        }

    def kv_blocks(k: int | None) -> list[int]:
        """Blocks per group one request holds right after its prefill."""
        engine.add_request(f"kv{k}", prompts(1)[0], params(k, 2))
        held: list[int] = []
        while engine.has_unfinished_requests():
            engine.step()
            for rid, request in sched.requests.items():
                if request.num_output_tokens >= 1 and not held:
                    held = held_blocks(sched, rid)
        return held

    for k in ks:  # warm-up: each K's path (compiled or withdrawing) at the timed shapes
        run_batch(k, 4, prompts(args.batch))
    runs: dict[str, list[dict[str, Any]]] = {str(k): [] for k in ks}
    for _ in range(args.repeats):  # alternate the Ks so drift hits them alike
        for k in ks:
            _wait_turn()
            run = run_batch(k, 1 + args.decode_tokens, prompts(args.batch))
            # The prefill/decode split means something only if the whole batch runs at
            # once (else "decode" times a second wave): the KV budget must hold it.
            if run["running_at_prefill"] != args.batch:
                raise RuntimeError(
                    f"{run['running_at_prefill']} of {args.batch} requests running after "
                    "prefill: raise --kv-mib so the timed batch fits stock and VTW alike"
                )
            runs[str(k)].append(run)
    per_k: dict[str, dict[str, Any]] = {}
    for k in ks:
        rs = runs[str(k)]
        entry: dict[str, Any] = {
            "prefill_tok_s": stats([r["prompt_tokens"] / r["prefill_s"] for r in rs]),
            "decode_tok_s": stats([r["decode_tokens"] / r["decode_s"] for r in rs]),
            "decode_ms_per_step": stats([r["decode_step_ms"] for r in rs]),
            "cached_tokens": sum(r["cached_tokens"] for r in rs),
        }
        if kv_bound:  # many requests at once, a budget that holds only a few stock ones
            _wait_turn()
            bound = run_batch(k, args.kv_bound_tokens, prompts(args.kv_bound_requests))
            blocks = kv_blocks(k)
            entry |= {
                "kv_bound_req_s": args.kv_bound_requests / bound["seconds"],
                "kv_bound_peak_running": bound["peak_running"],
                "kv_blocks": blocks,
                "kv_layer_blocks": sum(
                    b * n for b, n in zip(blocks, layers_per_group, strict=True)
                ),
            }
            entry["cached_tokens"] += bound["cached_tokens"]
        per_k[str(k)] = entry
    return {
        "layers_per_group": layers_per_group,
        "prompt_tokens_per_request": runs[str(ks[0])][0]["prompt_tokens"] // args.batch,
        "per_k": per_k,
    }


TURN = "SERVING_BENCH_TURN"


def _wait_turn() -> None:
    """In an interleaved child: say "ready" and block until the parent says "go", so that
    only one engine runs a timed batch at a time and the engines take turns."""
    if os.environ.get(TURN) == "1":
        print(TURN, flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("benchmark parent went away")


def interleaved(jobs: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    """Offline engines side by side, one child process each (``vtw_vllm.child_engine``;
    ``jobs``: name -> (target, arguments)), taking turns batch by batch (round robin:
    every timed batch of :func:`measure_engine` waits for its turn): slow drift of the
    machine's speed hits stock and VTW alike, and no two engines ever run a timed batch
    at the same time. Start-up and compilation overlap."""
    import contextlib
    import tempfile

    start = time.perf_counter()
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        procs, logs = {}, {}
        for name, (target, job_args) in jobs.items():
            logs[name] = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            procs[name] = subprocess.Popen(
                child_command(target, *job_args),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logs[name],
                text=True,
                env=os.environ | {TURN: "1"},
            )
        names = list(jobs)

        def advance(name: str) -> bool:
            """Read the child's output up to its next turn request; False when done."""
            proc = procs[name]
            for line in proc.stdout:
                if line.strip() == TURN:
                    return True
                if line.startswith(MARKER):
                    results[name] = json.loads(line[len(MARKER) :])
                    results[name]["child_seconds"] = time.perf_counter() - start
            proc.wait()
            if name not in results:
                logs[name].seek(0)
                raise RuntimeError(f"benchmark child {name} failed:\n{logs[name].read()[-5000:]}")
            return False

        waiting = [name for name in names if advance(name)]  # every engine up and warm
        while waiting:
            for name in list(waiting):
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                if not advance(name):
                    waiting.remove(name)
    return results


def offline_engines(kind: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The serving benchmark's offline engines (``names``: see :func:`engine_spec`) for one
    checkpoint, interleaved; each child runs :func:`offline_child` of this file."""
    print(f"[bench] offline {kind} {' '.join(names)} (interleaved) ...", flush=True)
    options = vars(args) | {"out": str(args.out)}
    target = f"{Path(__file__).resolve()}:offline_child"
    return interleaved(
        {n: (target, [kind, engine_spec(n, num_layers(kind), args.ks), options]) for n in names}
    )


def offline_child(kind: str, spec: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """:func:`offline`, called in the child process with the parent's options."""
    return offline(kind, spec, argparse.Namespace(**args))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(script: str) -> dict[str, Any]:
    """Where and when a benchmark ran: the exact command, machine, versions, commit."""
    import torch
    import vllm

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()

    import vtw_vllm

    return {
        "command": f"python {script} {shlex.join(sys.argv[1:])}".strip(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "vtw_vllm_modified": bool(git("status", "--porcelain", "--", "vtw_vllm")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "vtw_vllm_path": str(Path(vtw_vllm.__file__).parent),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def meta_line(meta: dict[str, Any]) -> str:
    modified = " (+ uncommitted changes under vtw_vllm/)" if meta["vtw_vllm_modified"] else ""
    gpu = f", GPU {meta['gpu']}" if meta["gpu"] else ", no GPU"
    busy = float(meta["load_before"].split()[0]) > 0.5 * meta["cpu_count"]
    warning = (
        f" **The machine was busy before the run (1-min load {meta['load_before'].split()[0]} "
        f"on {meta['cpu_count']} CPUs): timings are not trustworthy.**"
        if busy
        else ""
    )
    return (
        f"`{meta['command']}` — {meta['platform']}, {meta['cpu']}, {meta['cpu_count']} CPUs{gpu}, "
        f"vLLM {meta['vllm']}, torch {meta['torch']}, commit {meta['commit']}{modified}, "
        f"{meta['date']}; load average before/after {meta['load_before']} / "
        f"{meta.get('load_after', '?')}.{warning}"
    )


def fmt(stat: dict[str, float], digits: int = 1) -> str:
    """A figure of :func:`stats` as the report writes it: median [min-max]."""
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def over(value: dict[str, float] | float, base: dict[str, float] | float) -> float:
    """``value`` / ``base`` (of the medians where they are :func:`stats`): the "x stock"."""

    def med(v: dict[str, float] | float) -> float:
        return v["median"] if isinstance(v, dict) else v

    return med(value) / med(base)


def check_bar(
    stock: dict[str, Any], vtw: dict[str, Any], k: int, metric: str, op: str, bar: float
) -> dict[str, Any]:
    """One bar: VTW at ``k`` over stock (``measure_engine`` results) for ``metric``."""
    value = over(vtw["per_k"][str(k)][metric], stock["per_k"]["None"][metric])
    ok = value <= bar if op == "<=" else value >= bar
    return {"k": k, "metric": metric, "ratio": value, "op": op, "bar": bar, "pass": ok}


def budget_table(
    stock: dict[str, Any],
    vtw: dict[str, Any],
    pools: tuple[int, int],
    bound: Callable[[int], str],
) -> list[str]:
    """Stock and VTW per K (``measure_engine`` results, with ``kv_bound``): prefill,
    decode, KV per request and what fits a KV budget of ``pools`` (stock's, VTW's)
    blocks. ``bound(k)``: the FLOPs-bound cell of VTW at K = k (``benchmarks/video.py``
    and ``benchmarks/qwen_vl.py``)."""
    s = stock["per_k"]["None"]
    lines = [
        "| config | prefill tok/s | x stock | FLOPs bound: LM / all | decode tok/s | x stock | "
        "KV blocks / req (per group) | KV layer-blocks / req | x stock | "
        "requests that fit the KV budget | KV-bound req/s | x stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("stock", s, None, pools[0])]
    rows += [(f"VTW K={k}", r, int(k), pools[1]) for k, r in vtw["per_k"].items()]
    for name, r, k, pool in rows:
        lines.append(
            f"| {name} | {fmt(r['prefill_tok_s'], 0)} | "
            f"{over(r['prefill_tok_s'], s['prefill_tok_s']):.2f}x | "
            f"{bound(k) if k is not None else '1.00x / 1.00x'} | "
            f"{fmt(r['decode_tok_s'])} | {over(r['decode_tok_s'], s['decode_tok_s']):.2f}x | "
            f"{r['kv_blocks']} | {r['kv_layer_blocks']} | "
            f"{over(r['kv_layer_blocks'], s['kv_layer_blocks']):.2f}x | "
            f"{pool // sum(r['kv_blocks'])} | {r['kv_bound_req_s']:.3f} | "
            f"{over(r['kv_bound_req_s'], s['kv_bound_req_s']):.2f}x |"
        )
    return lines


def engines_table(rows: list[tuple[str, dict[str, Any], int, float]]) -> list[str]:
    """What each engine ran with (:func:`engine_settings`): rows of (name, settings,
    cached tokens of its timed requests, seconds until its child finished)."""
    lines = [
        "Engines as run (read back from each engine's config; cached tokens: the prefix-cache "
        "hits the engine reported for its timed requests):",
        "",
        "| engine | prefix caching | enforce_eager | compilation | async sched. | "
        "max batched tokens | max seqs | KV groups | block size | blocks | cached tokens | "
        "child s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e, cached, seconds in rows:
        lines.append(
            f"| {name} | {e['enable_prefix_caching']} | {e['enforce_eager']} | "
            f"{e['compilation_mode']} | {e['async_scheduling']} | {e['max_num_batched_tokens']} "
            f"| {e['max_num_seqs']} | {e['kv_cache_groups']} | {e['block_size']} | "
            f"{e['num_blocks']} | {cached} | {seconds:.0f} |"
        )
    return lines


def offline_table(kind: str, stock: dict[str, Any], vtw: dict[str, Any]) -> list[str]:
    """The offline figures of stock and VTW per K (parts ``defaults`` and ``eager``);
    ``benchmarks/`` must be on ``sys.path`` (``run.py`` puts it there)."""
    from flops import Shape, ratio  # benchmarks/flops.py

    shape = Shape.from_checkpoint(bench_checkpoint(kind))
    text_tokens = len(PROMPT.split()) + 10  # only for the FLOPs bound's n^2 term
    vision = stock["prompt_tokens_per_request"] - text_tokens
    s = stock["per_k"]["None"]
    lines = [
        "| config | prefill tok/s | x stock | FLOPs bound | decode tok/s | x stock | "
        "KV-bound req/s | x stock | peak running | KV layer-blocks / req | x stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("stock", s, None)] + [(f"VTW K={k}", r, int(k)) for k, r in vtw["per_k"].items()]
    for name, r, k in rows:
        bound = 1 / ratio(shape, vision, text_tokens, k) if k is not None else 1.0
        lines.append(
            f"| {name} | {fmt(r['prefill_tok_s'], 0)} | "
            f"{over(r['prefill_tok_s'], s['prefill_tok_s']):.2f}x | {bound:.2f}x | "
            f"{fmt(r['decode_tok_s'])} | {over(r['decode_tok_s'], s['decode_tok_s']):.2f}x | "
            f"{r['kv_bound_req_s']:.2f} | {over(r['kv_bound_req_s'], s['kv_bound_req_s']):.2f}x | "
            f"{r['kv_bound_peak_running']} | {r['kv_layer_blocks']} | "
            f"{over(r['kv_layer_blocks'], s['kv_layer_blocks']):.2f}x |"
        )
    return lines
