"""Multi-turn image chat: stock vLLM vs VTW (K = N/2), both at vLLM's defaults, one run.

    python benchmarks/multiturn.py [--quick] [--conversations 4] [--turns 8]
                                   [--max-tokens 16] [--out DIR]

Workload: ``--conversations`` chats, each about its own image (one no other request to
that engine carries), a first turn and ``--turns - 1`` follow-up questions. Each turn's
prompt is the whole conversation so far with the image resent, in the LLaVA-1.5 template
(the fixture tokenizer's EOS text is ``</s>``)::

    USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:

Answers are greedy, exactly ``--max-tokens`` tokens (``ignore_eos``), decoded with special
tokens skipped and fed back as text, "<" replaced by a space so that no answer can spell
a special token such as ``<image>``.

The conversations run concurrently: turn t of every conversation is submitted at once
(several users of one server), and turn t + 1 starts when all of turn t have finished.

Measured per engine, over the follow-up turns (turn 2 on):

- end-to-end time and TTFT of each request, from just before its ``add_request`` (image
  preprocessing included) to its last / first token, and the wall time of each batched
  turn; medians [min-max];
- the prefix-cache hit rate from vLLM's own counters (``LLM(disable_log_stats=False)``,
  ``llm.get_metrics()``: the deltas of ``vllm:prefix_cache_hits`` over
  ``vllm:prefix_cache_queries``, both in tokens), cross-checked against the requests'
  ``RequestOutput.num_cached_tokens``;
- after every request has finished, the KV blocks still in use: the scheduler's block pool
  (usable blocks - free blocks; cached-but-unreferenced blocks count as free) and the
  ``vllm:kv_cache_usage_perc`` gauge. Both must be 0.

Engines: the LLaVA-1.5-shaped benchmark checkpoint of ``benchmarks/serving/common.py``
(``bench_checkpoint("llava")``); VTW with ``vtw_k`` N/2 and ``vtw_allowed_k`` [N/2, N]
(two KV groups). Neither engine is passed ``enforce_eager`` or ``enable_prefix_caching``;
what each ran with is read back from its config and reported. Each engine runs in its own
child process (stock first), after a two-turn warm-up conversation on another image.
About 2 min on 2 CPU cores (``--quick``, 2 conversations x 3 turns: ~1.5 min).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from vtw_vllm.child_engine import in_process_engine_core, run_child, scheduler

HERE = Path(__file__).resolve().parent
QUESTIONS = [
    "What is in the picture? Describe it.",
    "What colour is the largest rectangle?",
    "How many rectangles are there?",
    "What is in the top left corner?",
    "Is there anything red in it?",
    "What is in the middle of the picture?",
    "What colour is the background?",
    "Which rectangle is the smallest?",
    "Does any rectangle overlap another one?",
    "Describe the picture again in one sentence.",
]


def serving_common() -> ModuleType:
    """benchmarks/serving/common.py (its checkpoint, engine read-back and run metadata)."""
    spec = importlib.util.spec_from_file_location("serving_common", HERE / "serving" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_prompt(history: list[tuple[str, str]], question: str) -> str:
    """The LLaVA-1.5 conversation so far plus the next question; the image in turn 1."""
    turns = [*history, (question, None)]
    text = ""
    for i, (q, a) in enumerate(turns):
        text += f"USER: {'<image>' + chr(10) if i == 0 else ''}{q} ASSISTANT:"
        text += f" {a}</s>" if a is not None else ""
    return text


def measure(vtw: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One engine (child process): the whole workload, its timings, hits and leftover KV."""
    in_process_engine_core()  # the scheduler lives in this process
    from vllm import LLM, SamplingParams

    from vtw_vllm.testing import make_test_image

    common = serving_common()
    n = common.num_layers("llava")
    overrides: dict[str, Any] = {
        "architectures": [f"Llava{'VTW' if vtw else ''}ForConditionalGeneration"]
    }
    if vtw:
        overrides |= {"vtw_k": n // 2, "vtw_allowed_k": [n // 2, n]}
    llm = LLM(
        model=str(common.bench_checkpoint("llava")),
        hf_overrides=overrides,
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        max_model_len=4096,
        dtype="float32",
        seed=0,
        disable_log_stats=False,
    )
    engine = llm.llm_engine
    pool = scheduler(llm).kv_cache_manager.block_pool
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def metrics() -> dict[str, float]:
        names = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:kv_cache_usage_perc")
        values = dict.fromkeys(names, 0.0)
        for metric in llm.get_metrics():
            if metric.name in names:
                values[metric.name] += float(metric.value)
        return values

    def run_turn(tag: str, chats: list[dict[str, Any]]) -> dict[str, Any]:
        """Turn t of every chat in one batch; answers appended to the histories."""
        submitted: dict[str, float] = {}
        before = metrics()
        start = time.perf_counter()
        for i, chat in enumerate(chats):
            rid = f"{tag}x{i}"
            question = QUESTIONS[len(chat["history"]) % len(QUESTIONS)]
            chat["question"] = question
            prompt = {"prompt": chat_prompt(chat["history"], question)}
            submitted[rid] = time.perf_counter()
            engine.add_request(rid, prompt | {"multi_modal_data": {"image": chat["image"]}}, params)
        first: dict[str, float] = {}
        done: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                if out.outputs and out.outputs[0].token_ids:
                    first.setdefault(out.request_id, now)
                if out.finished:
                    done[out.request_id] = (now, out)
        wall = time.perf_counter() - start
        after = metrics()
        requests = []
        for i, chat in enumerate(chats):
            rid = f"{tag}x{i}"
            end, out = done[rid]
            answer = out.outputs[0].text.replace("<", " ").strip()
            chat["history"].append((chat["question"], answer))
            requests.append(
                {
                    "prompt_tokens": len(out.prompt_token_ids),
                    "cached_tokens": out.num_cached_tokens or 0,
                    "ttft_s": first[rid] - submitted[rid],
                    "e2e_s": end - submitted[rid],
                }
            )
        return {
            "wall_s": wall,
            "requests": requests,
            "queries": after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"],
            "hits": after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"],
        }

    warm = [{"image": make_test_image(9000), "history": []}]
    for t in range(2):
        run_turn(f"w{t}", warm)
    chats = [{"image": make_test_image(100 + c), "history": []} for c in range(args.conversations)]
    turns = [run_turn(f"t{t}", chats) for t in range(args.turns)]
    while engine.has_unfinished_requests():  # nothing is left; make sure of it
        engine.step()
    follow = turns[1:]
    reqs = [r for turn in follow for r in turn["requests"]]
    queries = sum(turn["queries"] for turn in follow)
    prompt_tokens = sum(r["prompt_tokens"] for r in reqs)
    return {
        "vtw_k": n // 2 if vtw else None,
        "num_layers": n,
        "overrides": overrides,
        "engine": common.engine_settings(llm),
        "turns": turns,
        "follow_up": {
            "e2e_s": common.stats([r["e2e_s"] for r in reqs]),
            "ttft_s": common.stats([r["ttft_s"] for r in reqs]),
            "turn_wall_s": common.stats([turn["wall_s"] for turn in follow]),
            "hit_rate": sum(turn["hits"] for turn in follow) / queries if queries else 0.0,
            "queries": queries,
            "hit_rate_requests": sum(r["cached_tokens"] for r in reqs) / prompt_tokens,
        },
        "blocks_in_use_after": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
        "usable_blocks": pool.num_gpu_blocks - 1,
        "kv_cache_usage_perc_after": metrics()["vllm:kv_cache_usage_perc"],
        "first_chat": chats[0]["history"],
    }


def measure_child(vtw: bool, args: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure`, called in the child process with the parent's options."""
    return measure(vtw, argparse.Namespace(**args))


def _child(vtw: bool, args: argparse.Namespace) -> dict[str, Any]:
    print(f"[multiturn] {'VTW' if vtw else 'stock'} ...", flush=True)
    start = time.perf_counter()
    result = run_child(f"{Path(__file__).resolve()}:measure_child", vtw, vars(args))
    return result | {"child_seconds": time.perf_counter() - start}


def bars(stock: dict[str, Any], vtw: dict[str, Any]) -> list[dict[str, Any]]:
    s, v = stock["follow_up"], vtw["follow_up"]
    time_ratio = v["e2e_s"]["median"] / s["e2e_s"]["median"]
    return [
        {
            "bar": "VTW follow-up turn time (median request end-to-end) <= 1.0x stock",
            "value": f"{time_ratio:.2f}x",
            "pass": time_ratio <= 1.0,
        },
        {
            "bar": "VTW prefix-cache hit rate >= 0.9x stock's",
            "value": f"{v['hit_rate']:.1%} vs {s['hit_rate']:.1%}",
            "pass": v["hit_rate"] >= 0.9 * s["hit_rate"],
        },
        {
            "bar": "no KV block in use after every request finished (stock and VTW)",
            "value": f"stock {stock['blocks_in_use_after']}, VTW {vtw['blocks_in_use_after']}",
            "pass": stock["blocks_in_use_after"] == 0 and vtw["blocks_in_use_after"] == 0,
        },
    ]


def report(results: dict[str, Any], args: argparse.Namespace, meta_line: str) -> str:
    stock, vtw = results["stock"], results["vtw"]
    s, v = stock["follow_up"], vtw["follow_up"]
    k = f"VTW K={vtw['vtw_k']}"

    def fmt(stat: dict[str, float]) -> str:
        return f"{stat['median']:.3f} [{stat['min']:.3f}-{stat['max']:.3f}]"

    def x(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    lines = [
        f"# Multi-turn image chat: stock vLLM vs {k}, both at vLLM's defaults",
        "",
        meta_line,
        f"{args.conversations} conversations, each on its own image, {args.turns} turns "
        f"(1 + {args.turns - 1} follow-ups), {args.max_tokens} greedy tokens per answer "
        "(ignore_eos), the whole conversation and the image resent every turn; the "
        "conversations' turn t batched together. LLaVA-1.5-shaped benchmark checkpoint "
        f"({vtw['num_layers']} layers), KV budget {args.kv_mib} MiB. Follow-up turns only "
        "(turn 2 on); times: median [min-max] over the follow-up requests (turn wall: over "
        "the follow-up turns). Hit rate: vLLM's counters vllm:prefix_cache_hits / "
        "vllm:prefix_cache_queries over the follow-up turns (in brackets: the requests' "
        "num_cached_tokens / prompt tokens). The engines' answers differ (VTW withdraws the "
        "vision tokens), so their follow-up prompts differ slightly in length (per-turn "
        "table).",
        "",
        f"| follow-up turns | stock | {k} | VTW / stock |",
        "|---|---|---|---|",
        f"| request end-to-end s | {fmt(s['e2e_s'])} | {fmt(v['e2e_s'])} | "
        f"{x(v['e2e_s']['median'], s['e2e_s']['median'])} |",
        f"| TTFT s | {fmt(s['ttft_s'])} | {fmt(v['ttft_s'])} | "
        f"{x(v['ttft_s']['median'], s['ttft_s']['median'])} |",
        f"| batched turn wall s | {fmt(s['turn_wall_s'])} | {fmt(v['turn_wall_s'])} | "
        f"{x(v['turn_wall_s']['median'], s['turn_wall_s']['median'])} |",
        f"| prefix-cache hit rate | {s['hit_rate']:.1%} ({s['hit_rate_requests']:.1%}) | "
        f"{v['hit_rate']:.1%} ({v['hit_rate_requests']:.1%}) | {x(v['hit_rate'], s['hit_rate'])} |",
        f"| KV blocks in use after all finished | {stock['blocks_in_use_after']} of "
        f"{stock['usable_blocks']} | {vtw['blocks_in_use_after']} of {vtw['usable_blocks']} | |",
        f"| vllm:kv_cache_usage_perc after | {stock['kv_cache_usage_perc_after']:.4f} | "
        f"{vtw['kv_cache_usage_perc_after']:.4f} | |",
        "",
        "Bars:",
        "",
        *(
            f"- {'PASS' if b['pass'] else 'FAIL'}: {b['bar']} ({b['value']})"
            for b in results["bars"]
        ),
        "",
        "Per turn (mean over the conversations):",
        "",
        "| turn | stock prompt tokens | stock cached | stock e2e s | VTW prompt tokens | "
        "VTW cached | VTW e2e s | VTW / stock e2e |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, (ts, tv) in enumerate(zip(stock["turns"], vtw["turns"], strict=True), start=1):

        def mean(turn: dict[str, Any], key: str) -> float:
            return statistics.mean(r[key] for r in turn["requests"])

        lines.append(
            f"| {t} | {mean(ts, 'prompt_tokens'):.0f} | {mean(ts, 'cached_tokens'):.0f} | "
            f"{mean(ts, 'e2e_s'):.3f} | {mean(tv, 'prompt_tokens'):.0f} | "
            f"{mean(tv, 'cached_tokens'):.0f} | "
            f"{mean(tv, 'e2e_s'):.3f} | {x(mean(tv, 'e2e_s'), mean(ts, 'e2e_s'))} |"
        )
    lines += [
        "",
        "Engines as run (read back from each engine's config):",
        "",
        "| engine | prefix caching | enforce_eager | compilation | KV groups | block size | "
        "max batched tokens | child s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("stock", stock), (k, vtw)):
        e = r["engine"]
        lines.append(
            f"| {name} | {e['enable_prefix_caching']} | {e['enforce_eager']} | "
            f"{e['compilation_mode']} | {e['kv_cache_groups']} | {e['block_size']} | "
            f"{e['max_num_batched_tokens']} | {r['child_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 conversations x 3 turns")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8, help="first turn + follow-ups")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-mib", type=int, default=256)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns = 2, 3
    if args.turns < 2:
        parser.error("--turns must be at least 2 (a first turn and a follow-up)")
    common = serving_common()
    common.bench_checkpoint("llava")
    meta = common.run_meta("benchmarks/multiturn.py")
    started = time.perf_counter()
    results: dict[str, Any] = {"stock": _child(False, args), "vtw": _child(True, args)}
    results["bars"] = bars(results["stock"], results["vtw"])
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    meta["wall_s"] = round(time.perf_counter() - started)
    text = report(results, args, common.meta_line(meta))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multiturn.md").write_text(text)
    (args.out / "multiturn.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
