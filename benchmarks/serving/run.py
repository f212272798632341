"""Stock vLLM vs VTW, offline (the ``LLM`` engine) and online (``vllm serve``), in one run.

    python benchmarks/serving/run.py [--quick] [--models llava [llava_next]] [--parts ...]
                                     [--out DIR]

Four parts, each stock and VTW measured in the same run and reported as ratios to stock
(every timed figure: median [min-max] over the repeats):

1. ``defaults`` (the headline): stock vLLM and VTW both at vLLM's defaults: torch.compile
   on, neither ``enforce_eager`` nor ``enable_prefix_caching`` passed; what each engine
   actually ran with is read back from its config and reported. VTW deploys
   ``vtw_allowed_k`` [N/2, N] (two KV cache groups) and is measured at K = N/2 and K = N
   (per-request ``extra_args``). Pass/fail lines for the bars on the LLaVA-1.5-shaped
   checkpoint.
2. ``groups``: what each KV cache group costs per decode step: VTW at K = N (nothing
   withdrawn) with 1 group (``vtw_allowed_k`` [N]), 2 groups ([N/2, N]) and N/2 groups
   (``vtw_layer_group_size`` 2), vs stock; ms per step and the per-group slope.
3. ``eager``: stock and VTW both with ``enforce_eager=True`` and prefix caching off (the
   setting of the earlier runs); VTW with layer groups of 2 at every K in ``--ks`` and N.
4. ``online``: ``vllm serve`` at defaults for both (VTW as in 1), loaded by vLLM's own
   ``vllm bench serve`` (``openai-chat`` backend, ``random-mm`` dataset: streaming chat
   completions, one random-pixel image each, per-request K through ``--extra-body
   '{"vllm_xargs": {"vtw_k": K}}'``); TTFT, TPOT, ITL, end-to-end latency, request and
   token throughput read from its ``--save-result`` JSON; the exact commands go into the
   report.

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
values. Time on 2 CPU cores: ~12 min for the default run (LLaVA-1.5-shaped only: six
engines, two servers); ``--quick`` (one repeat, shorter batches, no online part) 4-7
min; each extra model adds about as much again. Timings need an otherwise idle machine:
the report flags a busy one.

The checkpoint is a benchmark-sized variant of the tiny fixture (same tokenizer, tower
and image processor; a 512-wide, 8-layer llama), so that, as in a real LLaVA, the
language model and not the vision tower dominates prefill. Random weights: the answers
are meaningless, the cost is not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import socket
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
RESULTS = REPO / "benchmarks" / "results"
PROMPT = "USER: <image>\nWhat is in the picture? Describe it. ASSISTANT:"
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


def _overrides(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    family = "LlavaNext" if kind == "llava_next" else "Llava"
    arch = f"{family}{'VTW' if spec['vtw'] else ''}ForConditionalGeneration"
    return {"architectures": [arch], **spec["layout"]}


class FreshImages:
    """Test images, each seed used once: no two requests to an engine share an image."""

    def __init__(self, kind: str, first_seed: int = 1000) -> None:
        self.size = (336, 336) if kind == "llava" else (448, 336)  # NeXT: anyres, 2 tiles
        self.next_seed = first_seed

    def take(self, n: int) -> list:
        from vtw_vllm.testing import make_test_image

        seeds = range(self.next_seed, self.next_seed + n)
        self.next_seed += n
        return [make_test_image(seed, size=self.size) for seed in seeds]


def _stats(values: list[float]) -> dict[str, Any]:
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
        hf_overrides=_overrides(kind, spec),
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        max_model_len=4096,
        dtype="float32",
        seed=0,
        **eager,
    )
    images = FreshImages(kind)

    def prompts(n: int) -> list[dict[str, Any]]:
        return [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images.take(n)]

    return {
        "kind": kind,
        "spec": spec,
        "overrides": _overrides(kind, spec),
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
            "prefill_tok_s": _stats([r["prompt_tokens"] / r["prefill_s"] for r in rs]),
            "decode_tok_s": _stats([r["decode_tokens"] / r["decode_s"] for r in rs]),
            "decode_ms_per_step": _stats([r["decode_step_ms"] for r in rs]),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]  # = the ``vllm`` command


def serve_args(kind: str, spec: dict[str, Any], port: int, args: argparse.Namespace) -> list[str]:
    """``vllm serve`` at vLLM's defaults: the checkpoint and engine settings of ``offline``."""
    return [
        "serve", str(bench_checkpoint(kind)), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--hf-overrides", json.dumps(_overrides(kind, spec)),
        "--max-model-len", "4096", "--kv-cache-memory-bytes", str(args.kv_mib * 2**20),
        "--seed", "0",
    ]  # fmt: skip


def bench_args(
    kind: str, port: int, k: int | None, seed: int, n: int, result: Path, args: argparse.Namespace
) -> list[str]:
    """``vllm bench serve``: streaming chat completions, one random-pixel image each
    (random-mm draws every image from ``--seed``: a new seed per round, so no two requests
    to a server share an image), ``n`` requests, ``--max-concurrency`` at once."""
    height, width = (336, 336) if kind == "llava" else (336, 448)  # as FreshImages
    cmd = [
        "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--host", "127.0.0.1", "--port", str(port), "--model", str(bench_checkpoint(kind)),
        "--dataset-name", "random-mm", "--num-prompts", str(n), "--seed", str(seed),
        "--random-input-len", str(args.online_text_tokens),
        "--random-output-len", str(args.online_tokens),
        "--random-mm-base-items-per-request", "1",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({height}, {width}, 1): 1.0}}",
        "--max-concurrency", str(args.concurrency), "--temperature", "0", "--ignore-eos",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
        "--disable-tqdm",
    ]  # fmt: skip
    if k is not None:
        cmd += ["--extra-body", json.dumps({"vllm_xargs": {"vtw_k": k}})]
    return cmd


def _prefix_cache_hits(base: str) -> float:
    """vLLM's counter of prompt tokens served from the prefix cache (all requests so far)."""
    import httpx

    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("vllm:prefix_cache_hits_total missing from /metrics")


def _bench(cmd: list[str], result: Path, log: Path, n: int) -> dict[str, Any]:
    """One ``vllm bench serve`` run; its saved result, checked complete."""
    with open(log, "a") as out:
        proc = subprocess.run([*VLLM_CLI, *cmd], stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode or not result.is_file():
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); see {log}")
    saved = json.loads(result.read_text())
    if saved["completed"] != n or saved["failed"]:
        raise RuntimeError(f"{saved['failed']} of {n} requests failed; see {log}")
    return saved


# (vllm bench serve's key, our name, scale to seconds / per second)
ONLINE_METRICS = (
    ("median_ttft_ms", "ttft_s", 1e-3),
    ("median_tpot_ms", "tpot_s", 1e-3),
    ("median_itl_ms", "itl_s", 1e-3),
    ("median_e2el_ms", "e2e_s", 1e-3),
    ("request_throughput", "req_s", 1.0),
    ("output_throughput", "output_tok_s", 1.0),
    ("total_token_throughput", "total_tok_s", 1.0),
)


def online(kind: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``vllm serve`` at vLLM's defaults under ``vllm bench serve`` (both subprocesses of
    this one): a warm-up round per K, then ``repeats`` timed rounds per K, alternating."""
    import httpx

    name = "vtw" if spec["vtw"] else "stock"
    port = _free_port()
    out = Path(args.out) / "bench_serve"
    out.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.out) / f"serve-{kind}-{name}.log"
    bench_log = Path(args.out) / f"bench-{kind}-{name}.log"
    bench_log.write_text("")
    serve = serve_args(kind, spec, port, args)
    log = open(log_path, "w")  # noqa: SIM115
    server = subprocess.Popen([*VLLM_CLI, *serve], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    ks = spec["ks"]
    rounds: dict[str, list[dict[str, Any]]] = {str(k): [] for k in ks}
    commands: dict[str, str] = {}
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited; see {log_path}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("vllm serve did not start in 10 minutes")
            time.sleep(2)
        for rep in range(-1, args.repeats):  # -1: warm-up (each K's path at these shapes)
            for i, k in enumerate(ks):
                # A new seed per round (no image seen twice by a server); stock's round and
                # VTW's first K's get the same seed: the same requests.
                seed = 100 * (rep + 2) + i
                n = args.concurrency if rep < 0 else args.online_requests
                tag = "warmup" if rep < 0 else f"r{rep}"
                result = out / f"{kind}-{name}-k{k}-{tag}.json"
                result.unlink(missing_ok=True)
                cmd = bench_args(kind, port, k, seed, n, result, args)
                hits = _prefix_cache_hits(base)
                saved = _bench(cmd, result, bench_log, n)
                saved["cached_tokens"] = _prefix_cache_hits(base) - hits
                saved["seed"] = seed
                if rep >= 0:
                    rounds[str(k)].append(saved)
                    commands.setdefault(str(k), shlex.join(["vllm", *cmd]))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    text = log_path.read_text()
    engine = {  # what the server's engine ran with, from its start-up line
        key: (match.group(1) if (match := re.search(rf"\b{key}=(\w+)", text)) else "?")
        for key in ("enable_prefix_caching", "enforce_eager")
    }
    per_k: dict[str, dict[str, Any]] = {}
    for k, rs in rounds.items():
        per_k[k] = {
            ours: _stats([r[key] * scale for r in rs]) for key, ours, scale in ONLINE_METRICS
        }
        per_k[k]["cached_tokens"] = sum(r["cached_tokens"] for r in rs)
        per_k[k]["prompt_tokens_per_request"] = rs[0]["total_input_tokens"] / rs[0]["completed"]
        per_k[k]["seeds"] = [r["seed"] for r in rs]
    return {
        "engine": engine,
        "serve_command": shlex.join(["vllm", *serve]),
        "bench_commands": commands,
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


def _interleaved(kind: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """This script's offline engines for one checkpoint, interleaved."""
    print(f"[bench] offline {kind} {' '.join(names)} (interleaved) ...", flush=True)
    options = vars(args) | {"out": str(args.out)}
    target = f"{Path(__file__).resolve()}:offline_child"
    return interleaved(
        {n: (target, [kind, engine_spec(n, num_layers(kind), args.ks), options]) for n in names}
    )


def offline_child(kind: str, spec: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """:func:`offline`, called in the child process with the parent's options."""
    return offline(kind, spec, argparse.Namespace(**args))


def _online(kind: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine's online part, run from here (the server and the load generator are
    subprocesses already)."""
    print(f"[bench] online {kind} {name} ...", flush=True)
    start = time.perf_counter()
    result = online(kind, engine_spec(name, num_layers(kind), args.ks), args)
    result["child_seconds"] = time.perf_counter() - start
    return result


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


def _fmt(stat: dict[str, float], digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def _x(value: dict[str, float] | float, base: dict[str, float] | float) -> float:
    def med(v: dict[str, float] | float) -> float:
        return v["median"] if isinstance(v, dict) else v

    return med(value) / med(base)


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def _offline_table(kind: str, stock: dict[str, Any], vtw: dict[str, Any]) -> list[str]:
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
            f"| {name} | {_fmt(r['prefill_tok_s'], 0)} | "
            f"{_x(r['prefill_tok_s'], s['prefill_tok_s']):.2f}x | {bound:.2f}x | "
            f"{_fmt(r['decode_tok_s'])} | {_x(r['decode_tok_s'], s['decode_tok_s']):.2f}x | "
            f"{r['kv_bound_req_s']:.2f} | {_x(r['kv_bound_req_s'], s['kv_bound_req_s']):.2f}x | "
            f"{r['kv_bound_peak_running']} | {r['kv_layer_blocks']} | "
            f"{_x(r['kv_layer_blocks'], s['kv_layer_blocks']):.2f}x |"
        )
    return lines


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The bars on the LLaVA-1.5-shaped checkpoint, VTW vs stock both at defaults."""
    if "vtw" not in results.get("llava", {}):
        return []
    stock = results["llava"]["stock"]["per_k"]["None"]
    vtw = results["llava"]["vtw"]
    n = vtw["num_layers"]
    checks = [(n // 2, "decode_tok_s", 1.0), (n // 2, "prefill_tok_s", 1.7)]
    checks += [(n, "prefill_tok_s", 0.97), (n, "decode_tok_s", 0.97)]
    out = []
    for k, metric, bar in checks:
        value = _x(vtw["per_k"][str(k)][metric], stock[metric])
        out.append({"k": k, "metric": metric, "ratio": value, "bar": bar, "pass": value >= bar})
    return out


def _groups_section(res: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    stock = res["stock"]["per_k"]["None"]
    n = res["vtw"]["num_layers"]
    rows = [("stock", res["stock"]["engine"]["kv_cache_groups"], stock)]
    for name in ("vtw_1group", "vtw", "vtw_group_size2"):
        rows.append(
            (f"VTW {name}", res[name]["engine"]["kv_cache_groups"], res[name]["per_k"][str(n)])
        )
    lines = [
        "| engine (K = N: nothing withdrawn) | KV groups | decode ms/step | x stock | "
        "prefill tok/s | x stock |",
        "|---|---|---|---|---|---|",
    ]
    for name, groups, r in rows:
        lines.append(
            f"| {name} | {groups} | {_fmt(r['decode_ms_per_step'], 2)} | "
            f"{_x(r['decode_ms_per_step'], stock['decode_ms_per_step']):.2f}x | "
            f"{_fmt(r['prefill_tok_s'], 0)} | "
            f"{_x(r['prefill_tok_s'], stock['prefill_tok_s']):.2f}x |"
        )
    xs = [float(g) for _, g, _ in rows[1:]]
    ys = [r["decode_ms_per_step"]["median"] for _, _, r in rows[1:]]
    fit = {
        "ms_per_group": _slope(xs, ys),
        "stock_ms_per_step": stock["decode_ms_per_step"]["median"],
        "vtw_1group_over_stock_ms": ys[0] - stock["decode_ms_per_step"]["median"],
    }
    share = 100 * fit["ms_per_group"] / fit["stock_ms_per_step"]
    lines += [
        "",
        f"Least-squares slope over the VTW engines: **{fit['ms_per_group']:+.3f} ms per "
        f"decode step per extra KV group** ({share:+.1f}% "
        f"of stock's {fit['stock_ms_per_step']:.2f} ms step); VTW with one group (the "
        f"plugin's fixed cost) {fit['vtw_1group_over_stock_ms']:+.3f} ms vs stock.",
    ]
    return lines, fit


def _online_section(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The ``vllm bench serve`` figures, VTW / stock, and the commands that made them."""
    stock = res["online_stock"]["per_k"]["None"]
    columns = (  # (header, our key, digits, x 1000: ms)
        ("TTFT ms", "ttft_s", 1, True),
        ("TPOT ms", "tpot_s", 2, True),
        ("ITL ms", "itl_s", 2, True),
        ("e2e ms", "e2e_s", 1, True),
        ("req/s", "req_s", 2, False),
        ("output tok/s", "output_tok_s", 1, False),
        ("total tok/s", "total_tok_s", 0, False),
    )
    lines = [
        "### Online: vllm serve at defaults, loaded by vllm bench serve",
        "",
        "| online | " + " | ".join(f"{h} | x stock" for h, *_ in columns) + " | cached tokens |",
        "|---|" + "---|---|" * len(columns) + "---|",
    ]
    rows = [("stock", stock)] + [(f"VTW K={k}", v) for k, v in res["online_vtw"]["per_k"].items()]
    for name, r in rows:
        cells = []
        for _, key, digits, ms in columns:
            scale = 1e3 if ms else 1.0
            stat = {m: r[key][m] * scale for m in ("median", "min", "max")}
            cells.append(f"{_fmt(stat, digits)} | {_x(r[key], stock[key]):.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['cached_tokens']:.0f} |")
    tokens = stock["prompt_tokens_per_request"]
    lines += [
        "",
        f"Medians per round as `vllm bench serve` reports them ({tokens:.0f} prompt tokens per "
        "request, from the server's usage), then median [min-max] over the rounds; cached "
        "tokens: the server's `vllm:prefix_cache_hits` counter over the timed rounds. "
        "Commands (`vllm` = `python -m vllm.entrypoints.cli.main`; each engine's first "
        "timed round; the other rounds differ in `--seed` and `--result-filename` only, and "
        "a warm-up round per K ran first with `--num-prompts "
        f"{args.concurrency}`):",
        "",
    ]
    for name in ("online_stock", "online_vtw"):
        lines += [f"- {name}: `{res[name]['serve_command']}`"]
        for k, cmd in res[name]["bench_commands"].items():
            seeds = res[name]["per_k"][k]["seeds"]
            lines.append(f"  - K={k} (seeds {seeds}): `{cmd}`")
    return lines


def report(results: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    """Markdown: per model, the defaults table first, then its bars, groups, eager, online."""
    lines = [
        "# Serving benchmark: stock vLLM vs VTW",
        "",
        meta_line(meta),
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
            allowed = res["vtw"]["engine"]["allowed_k"]
            lines += [
                f"### At vLLM's defaults: stock vs VTW (vtw_allowed_k {allowed}, "
                f"{res['vtw']['engine']['kv_cache_groups']} KV groups)",
                "",
                *_offline_table(kind, res["stock"], res["vtw"]),
                "",
            ]
            if kind == "llava":
                lines += ["Bars (LLaVA-1.5-shaped, both at defaults):", ""]
                for b in results.get("bars", []):
                    verdict = "PASS" if b["pass"] else "FAIL"
                    lines.append(
                        f"- {verdict}: K={b['k']} {b['metric'].split('_')[0]} "
                        f"{b['ratio']:.2f}x stock (bar >= {b['bar']}x)"
                    )
                lines.append("")
        if "vtw_1group" in res:
            section, _ = _groups_section(res)
            lines += ["### Per-step cost of KV cache groups (defaults, K = N)", "", *section, ""]
        if "vtw_eager" in res:
            lines += [
                "### Eager: enforce_eager=True and prefix caching off, both (VTW layer groups "
                "of 2)",
                "",
                *_offline_table(kind, res["stock_eager"], res["vtw_eager"]),
                "",
            ]
        if "online_vtw" in res:
            lines += [*_online_section(res, args), ""]
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
                ratios = [_x(per_k[str(k)][key], stock[key]) for k in ks]
                row[0].plot(
                    ks, ratios, style, color=color, marker="o", label=f"{label}, {vtw_name}"
                )
        row[0].axhline(1.0, color="grey", linewidth=0.8)
        row[0].set_xlabel("K (layers that see the vision tokens)")
        row[0].set_ylabel("x stock")
        row[0].set_title(f"{kind}: VTW / stock (solid: defaults, dashed: eager)")
        row[0].legend(fontsize=7)
        if "vtw_1group" in res:
            n = res["vtw"]["num_layers"]
            names = ("vtw_1group", "vtw", "vtw_group_size2")
            groups = [res[m]["engine"]["kv_cache_groups"] for m in names]
            ms = [res[m]["per_k"][str(n)]["decode_ms_per_step"]["median"] for m in names]
            row[1].plot(groups, ms, marker="o", label="VTW, K = N")
            stock_ms = res["stock"]["per_k"]["None"]["decode_ms_per_step"]["median"]
            row[1].axhline(stock_ms, color="grey", linestyle=":", label="stock")
            row[1].set_xlabel("KV cache groups")
            row[1].set_ylabel("decode ms / step")
            row[1].set_title(f"{kind}: per-step cost of KV groups")
            row[1].legend(fontsize=7)
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
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for kind in args.models:
        bench_checkpoint(kind)
        results[kind] = {}
        names = [n for n, needed_by in ENGINE_PARTS.items() if any(p in parts for p in needed_by)]
        at_defaults = [n for n in names if not engine_spec(n, 2, []).get("eager")]
        for group in (at_defaults, [n for n in names if n not in at_defaults]):
            if group:  # none: online only
                results[kind] |= _interleaved(kind, group, args)
        if "online" in parts:
            for name in ("stock", "vtw"):
                results[kind][f"online_{name}"] = _online(kind, name, args)
    results["bars"] = bars(results)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = round(time.perf_counter() - started)
    text = report(results, args, meta)
    (args.out / "serving.md").write_text(text)
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    plot(results, args, args.out / "serving.png")
    print(text)


if __name__ == "__main__":
    main()
