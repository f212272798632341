"""The main job: the same image requests through stock vLLM and through VTW, side by side.

``python -m vtw_vllm.demo [--model DIR] [--vtw-k K]`` (default: the shipped
``checkpoints/vqa-tiny``, trained by ``vtw_vllm.quality.train``, asked held-out questions
with known answers; if absent, the tiny random-weight LLaVA-1.5 fixture with generic questions;
K = N/2; any checkpoint VTW serves, LLaVA or Qwen-VL, with ``--model``).
For each engine it prints the answers, prompt tokens, the KV blocks each request held
(read from the scheduler's block tables) and the time. Each engine
runs in its own child process with the engine core in-process, so its scheduler can be
inspected; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vtw_vllm.child_engine import (
    bytes_per_block,
    held_blocks,
    in_process_engine_core,
    run_child,
    scheduler,
)
from vtw_vllm.prompts import engine_prompt

TRAINED = Path(__file__).resolve().parents[1] / "checkpoints" / "vqa-tiny"
QUESTIONS = [
    "What is in the picture?",
    "Describe the colours and the shapes you can see.",
    "Which shape is the largest?",
    "Is there a red square?",
]


def _architecture(model: str, vtw: bool) -> str:
    """The checkpoint's own architecture (stock), or the VTW class serving it."""
    from vtw_vllm.calibrate import vtw_architecture

    if vtw:
        return vtw_architecture(model)
    return json.loads((Path(model) / "config.json").read_text())["architectures"][0]


def demo_requests(model: str, n: int) -> list[tuple[str, object, str | None]]:
    """(question, image, expected answer or None): the shapes-VQA task's held-out
    questions for a model trained on it (its directory holds ``training_log.json``), else
    generic questions about the fixtures' test images."""
    if (Path(model) / "training_log.json").is_file():
        from vtw_vllm.quality import task

        return [(qa.question, scene.render(), qa.answer) for scene, qa in task.held_out(n)]
    from vtw_vllm.testing import make_test_image

    return [(QUESTIONS[i % len(QUESTIONS)], make_test_image(100 + i), None) for i in range(n)]


def run_engine(
    model: str, vtw_k: int | None, num_prompts: int, max_tokens: int, eager: bool = False
) -> dict:
    """Generate with one engine (stock when vtw_k is None) and measure it; ``eager``:
    without compilation (seconds to start instead of ~30 s on a CPU)."""
    in_process_engine_core()  # the scheduler lives in this process
    from vllm import LLM, SamplingParams

    overrides = {"architectures": [_architecture(model, vtw_k is not None)]}
    if vtw_k is not None:
        overrides["vtw_k"] = vtw_k
        overrides["vtw_allowed_k"] = [vtw_k]  # two KV groups: layers < K and layers >= K
    llm = LLM(
        model=model,
        hf_overrides=overrides,
        max_model_len=4096,
        max_num_seqs=8,
        kv_cache_memory_bytes=256 * 2**20,
        enforce_eager=eager,
    )  # both at vLLM's defaults (compiled, prefix caching on; distinct images: no hits)
    sched = scheduler(llm)
    groups = sched.kv_cache_config.kv_cache_groups
    block_bytes = bytes_per_block(sched)
    # min_tokens=1: a request whose first token is </s> would finish inside its prefill
    # step and free its blocks before they can be read.
    params = SamplingParams(temperature=0.0, max_tokens=max(2, max_tokens), min_tokens=1)
    for i, (question, image, _) in enumerate(demo_requests(model, num_prompts)):
        prompt = engine_prompt(llm, "image", question)  # LLaVA's format or the chat template
        llm.llm_engine.add_request(
            str(i), {"prompt": prompt, "multi_modal_data": {"image": image}}, params
        )

    peak_blocks: dict[str, list[int]] = {}
    outputs = {}
    start = time.perf_counter()
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = out
        for req_id in sched.requests:
            held = held_blocks(sched, req_id)
            peak = peak_blocks.setdefault(req_id.split("-")[0], [0] * len(held))
            peak_blocks[req_id.split("-")[0]] = [max(a, b) for a, b in zip(peak, held, strict=True)]
    elapsed = time.perf_counter() - start
    requests = []
    for req_id, out in sorted(outputs.items(), key=lambda kv: int(kv[0])):
        blocks = peak_blocks[req_id.split("-")[0]]
        requests.append(
            {
                "answer": out.outputs[0].text,
                "prompt_tokens": len(out.prompt_token_ids),
                "kv_blocks": blocks,
                "kv_mib": sum(b * n for b, n in zip(blocks, block_bytes, strict=True)) / 2**20,
            }
        )
    return {
        "groups": [len(g.layer_names) for g in groups],
        "seconds": elapsed,
        "requests": requests,
        "num_layers": llm.llm_engine.vllm_config.model_config.hf_text_config.num_hidden_layers,
    }


def _child(model: str, vtw_k: int | None, args: argparse.Namespace) -> dict:
    """:func:`run_engine` in a fresh process (one engine per process)."""
    return run_child(
        "vtw_vllm.demo:run_engine",
        model,
        vtw_k,
        args.num_prompts,
        args.max_tokens,
        args.enforce_eager,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="LLaVA or Qwen-VL checkpoint dir (default: checkpoints/vqa-tiny, else fixture)",
    )
    parser.add_argument("--vtw-k", type=int, help="withdrawal layer (default: N/2)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="both engines without compilation"
    )
    args = parser.parse_args()

    if args.model is None and (TRAINED / "config.json").is_file():
        args.model = str(TRAINED)
    elif args.model is None:
        from vtw_vllm.testing import get_fixture

        args.model = str(get_fixture("llava"))

    print(f"model: {args.model}\nstarting the stock engine ...", flush=True)
    stock = _child(args.model, None, args)
    k = args.vtw_k if args.vtw_k is not None else stock["num_layers"] // 2
    print(f"starting the VTW engine (K={k} of {stock['num_layers']} layers) ...", flush=True)
    vtw = _child(args.model, k, args)

    print(f"\n{'':4} {'stock vLLM':<44} {'VTW K=' + str(k):<44}")
    asked = demo_requests(args.model, args.num_prompts)
    for i, (a, b) in enumerate(zip(stock["requests"], vtw["requests"], strict=True)):
        question, _, expected = asked[i]
        print(f"#{i:<3} {question}" + (f"  (expected: {expected})" if expected else ""))
        print(f"{'':4} {a['answer'][:42]!r:<44} {b['answer'][:42]!r:<44}")
        print(
            f"{'':4} {a['prompt_tokens']} prompt tokens, KV blocks {a['kv_blocks']} "
            f"({a['kv_mib']:.2f} MiB){'':3} {b['prompt_tokens']} prompt tokens, "
            f"KV blocks {b['kv_blocks']} ({b['kv_mib']:.2f} MiB)"
        )
    stock_mib = sum(r["kv_mib"] for r in stock["requests"])
    vtw_mib = sum(r["kv_mib"] for r in vtw["requests"])
    print(
        f"\nKV cache groups (layers each): stock {stock['groups']}, VTW {vtw['groups']}\n"
        f"KV memory held: stock {stock_mib:.2f} MiB, VTW {vtw_mib:.2f} MiB "
        f"({vtw_mib / stock_mib:.2f}x)\n"
        f"generation time: stock {stock['seconds']:.2f} s, VTW {vtw['seconds']:.2f} s "
        f"(2-core CPU timings are indicative only; see benchmarks/)"
    )


if __name__ == "__main__":
    main()
