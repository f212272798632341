"""Part ``online`` of the serving benchmark (``run.py --parts online``).

``vllm serve`` at defaults for both (VTW as in part ``defaults``), loaded by vLLM's own
``vllm bench serve`` (``openai-chat`` backend, ``random-mm`` dataset: streaming chat
completions, one random-pixel image each, per-request K through ``--extra-body
'{"vllm_xargs": {"vtw_k": K}}'``); TTFT, TPOT, ITL, end-to-end latency, request and token
throughput read from its ``--save-result`` JSON; the exact commands go into the report.
The server and the load generator are subprocesses of ``run.py``, one engine after the
other.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import bench_checkpoint, engine_spec, fmt, hf_overrides, num_layers, over, stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]  # = the ``vllm`` command


def serve_args(kind: str, spec: dict[str, Any], port: int, args: argparse.Namespace) -> list[str]:
    """``vllm serve`` at vLLM's defaults: the checkpoint and engine settings of
    ``common.offline``."""
    return [
        "serve", str(bench_checkpoint(kind)), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--hf-overrides", json.dumps(hf_overrides(kind, spec)),
        "--max-model-len", "4096", "--kv-cache-memory-bytes", str(args.kv_mib * 2**20),
        "--seed", "0",
        "--tensor-parallel-size", str(getattr(args, "tensor_parallel_size", 1)),
        "--data-parallel-size", str(getattr(args, "data_parallel_size", 1)),
    ]  # fmt: skip


def bench_args(
    kind: str, port: int, k: int | None, seed: int, n: int, result: Path, args: argparse.Namespace
) -> list[str]:
    """``vllm bench serve``: streaming chat completions, one random-pixel image each
    (random-mm draws every image from ``--seed``: a new seed per round, so no two requests
    to a server share an image), ``n`` requests, ``--max-concurrency`` at once."""
    height, width = (336, 336) if kind == "llava" else (336, 448)  # as common.FreshImages
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
            ours: stats([r[key] * scale for r in rs]) for key, ours, scale in ONLINE_METRICS
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


def measure(kind: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine's online part, run from here (the server and the load generator are
    subprocesses already)."""
    print(f"[bench] online {kind} {name} ...", flush=True)
    start = time.perf_counter()
    result = online(kind, engine_spec(name, num_layers(kind), args.ks), args)
    result["child_seconds"] = time.perf_counter() - start
    return result


def section(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The report's section: the ``vllm bench serve`` figures, VTW / stock, and the
    commands that made them."""
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
            cells.append(f"{fmt(stat, digits)} | {over(r[key], stock[key]):.2f}x")
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
    lines.append("")
    return lines
