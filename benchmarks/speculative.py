"""n-gram speculative decoding: stock vLLM vs VTW, both with it on, at vLLM's defaults.

    python benchmarks/speculative.py [--batch 8] [--repeats 5] [--tokens 64]

Two engines in child processes taking turns batch by batch (``serving/common.py``'s
``interleaved``): stock and VTW (``vtw_allowed_k`` [4, 8], measured at K = 4 and
K = 8 per request), both with ``speculative_config={"method": "ngram",
"num_speculative_tokens": 3}`` and otherwise vLLM's defaults (compiled, prefix caching
on). The model is the shipped ``checkpoints/vqa-tiny`` (a trained tiny LLaVA, 8
layers): past its short answer (``ignore_eos``) it repeats itself, so the proposer's
drafts are accepted as they would be on real repetitive output; a random-weight
checkpoint accepts almost none. Each batch: ``--batch`` requests, each with an image
its engine has not seen (no prefix-cache hit), a shapes question, ``--tokens`` tokens.

Per engine and K: output tokens/s over whole requests (prefill included), decode
tokens/s (the batch's tokens after the first over the time from the batch's last first
token to its last token, from vLLM's per-request engine timestamps), and the acceptance
rate (accepted / drafted tokens, from vLLM's
``vllm:spec_decode_*`` counters). Writes ``benchmarks/results/speculative.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "serving"))
from common import REPO, interleaved, meta_line, run_meta, stats  # noqa: E402

MODEL = REPO / "checkpoints" / "vqa-tiny"
SPEC = {"method": "ngram", "num_speculative_tokens": 3}
QUESTIONS = ["Is there a red circle?", "What colour is the square?", "How many shapes?"]
RESULTS = REPO / "benchmarks" / "results"


def child(vtw: bool, args: dict[str, Any]) -> dict[str, Any]:
    """One engine: every K it serves, ``repeats`` timed batches each (taking turns)."""
    from common import _wait_turn
    from vllm import LLM, SamplingParams

    from vtw_vllm.child_engine import in_process_engine_core
    from vtw_vllm.testing import make_test_image

    in_process_engine_core()
    arch = "LlavaVTWForConditionalGeneration" if vtw else "LlavaForConditionalGeneration"
    overrides = {"architectures": [arch], **({"vtw_allowed_k": [4, 8]} if vtw else {})}
    llm = LLM(
        model=str(MODEL),
        hf_overrides=overrides,
        speculative_config=SPEC,
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=128 * 2**20,  # the other benchmarks' budget, for both
        seed=0,
        disable_log_stats=False,
    )
    seeds = iter(range(5000, 10**6))

    def batch(k: int | None, tokens: int) -> float:
        prompts = [
            {
                "prompt": f"USER: <image>\n{QUESTIONS[i % 3]} ASSISTANT:",
                "multi_modal_data": {"image": make_test_image(next(seeds))},
            }
            for i in range(args["batch"])
        ]
        extra = None if k is None else {"vtw_k": k}
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, extra_args=extra)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        # Decode: from the last request's first token to the last token (engine-core
        # timestamps), when every request of the batch is decoding.
        first = max(o.metrics.first_token_ts for o in outputs)
        last = max(o.metrics.last_token_ts for o in outputs)
        return elapsed, last - first

    def counters() -> tuple[float, float]:
        values = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()}
        return (
            values.get("vllm:spec_decode_num_draft_tokens", 0.0),
            values.get("vllm:spec_decode_num_accepted_tokens", 0.0),
        )

    ks = [4, 8] if vtw else [None]
    per_k: dict[str, Any] = {}
    for k in ks:
        batch(k, args["tokens"])  # warm-up (compilation, caches)
        full, decode, drafted, accepted = [], [], 0.0, 0.0
        for _ in range(args["repeats"]):
            _wait_turn()
            d0, a0 = counters()
            elapsed, decode_s = batch(k, args["tokens"])
            d1, a1 = counters()
            drafted, accepted = drafted + d1 - d0, accepted + a1 - a0
            full.append(elapsed)
            decode.append(decode_s)
        n = args["batch"]
        per_k[str(k)] = {
            "output_tok_s": stats([n * args["tokens"] / t for t in full]),
            "decode_tok_s": stats([n * (args["tokens"] - 1) / t for t in decode]),
            "drafted": drafted,
            "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
        }
    return {"vtw": vtw, "per_k": per_k}


def report(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> str:
    base = results["stock"]["per_k"]["None"]
    lines = [
        "# n-gram speculative decoding: stock vs VTW, both with it on",
        "",
        meta_line(meta),
        f"Model `checkpoints/vqa-tiny`; `speculative_config` {json.dumps(SPEC)}; both at "
        f"vLLM's defaults otherwise; {args.batch} image requests per batch (fresh images), "
        f"{args.tokens} tokens each (`ignore_eos`), {args.repeats} repeats, engines "
        "interleaved. Figures: median [min-max]; ratios VTW / stock of the same run.",
        "",
        "| engine | output tok/s | x stock | decode tok/s | x stock | acceptance |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("stock", base)] + [(f"VTW K={k}", r) for k, r in results["vtw"]["per_k"].items()]
    for name, r in rows:
        o, d = r["output_tok_s"], r["decode_tok_s"]
        lines.append(
            f"| {name} | {o['median']:.0f} [{o['min']:.0f}-{o['max']:.0f}] | "
            f"{o['median'] / base['output_tok_s']['median']:.2f}x | "
            f"{d['median']:.0f} [{d['min']:.0f}-{d['max']:.0f}] | "
            f"{d['median'] / base['decode_tok_s']['median']:.2f}x | "
            f"{r['acceptance']:.1%} ({r['accepted']:.0f} of {r['drafted']:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    meta = run_meta("benchmarks/speculative.py")
    target = f"{Path(__file__).resolve()}:child"
    options = {"batch": args.batch, "repeats": args.repeats, "tokens": args.tokens}
    start = time.perf_counter()
    results = interleaved({"stock": (target, [False, options]), "vtw": (target, [True, options])})
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = round(time.perf_counter() - start)
    text = report(results, meta, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative.md").write_text(text)
    (args.out / "speculative.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
