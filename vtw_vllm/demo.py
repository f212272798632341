"""The main job: build the tiny LLaVA-1.5-shaped checkpoint and generate from it with vLLM.

Usage: ``python -m vtw_vllm.demo [--model DIR] [--num-prompts N]``.
"""

import argparse
import time

from vtw_vllm.testing import get_fixture, make_test_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a llava-hf checkpoint directory (default: tiny fixture)")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    model = args.model or str(get_fixture("llava"))
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=2048,
        max_num_seqs=8,
        kv_cache_memory_bytes=256 * 2**20,
        enforce_eager=True,
    )
    prompts = [
        {
            "prompt": f"USER: <image>\nDescribe picture number {i}. ASSISTANT:",
            "multi_modal_data": {"image": make_test_image(seed=i)},
        }
        for i in range(args.num_prompts)
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    elapsed = time.perf_counter() - start
    for out in outputs:
        print(f"[{len(out.prompt_token_ids)} prompt tokens] {out.outputs[0].text!r}")
    print(f"{len(outputs)} requests in {elapsed:.1f} s (model: {model})")


if __name__ == "__main__":
    main()
