"""n-gram speculative decoding with VTW, on the real engine (CPU).

The n-gram proposer drafts from the tokens alone; each verification step schedules the
last token and its drafts as several rows per request, in every KV group (compacted
ones included: those rows are text). Greedy outputs must equal the same VTW engine
without speculation, for mixed K; the proposer must really propose and have drafts
accepted; each KV group's blocks must follow the kept-token formula through rejections,
and every block must return.

The engines run in a child process (``vtw_vllm.child_engine.run_child``, engine core
in-process there, so its scheduler is read between steps): the n-gram proposer imports
numba, and once llvmlite is in a process, vLLM 0.32 fails every later compiled engine
start there (its Triton kernel-override scan calls ``vars(llvmlite.binding.ffi.lib)``,
which is not a dict). The model is the shipped ``checkpoints/vqa-tiny`` (a trained
tiny LLaVA): past its short answer (``ignore_eos``) it repeats itself, so drafts get
accepted; the random fixtures' answers almost never repeat an n-gram.
"""

import math
import time
from pathlib import Path

import pytest

from vtw_vllm.child_engine import run_child
from vtw_vllm.testing import make_test_image
from vtw_vllm.testing.reference import vtw_generate
from vtw_vllm.vision_ranges import kept_tokens, vision_ranges

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
MODEL = str(Path(__file__).resolve().parents[1] / "checkpoints" / "vqa-tiny")
NUM_SPEC = 3
OVERRIDES = {"architectures": ["LlavaVTWForConditionalGeneration"], "vtw_allowed_k": [1, 4, 7]}
SPEC = {"method": "ngram", "num_speculative_tokens": NUM_SPEC, "prompt_lookup_min": 2}
MAX_TOKENS = 32
REQUESTS = [  # (question, image seed or None, K)
    ("Is there a red circle?", 40, 1),
    ("What colour is the square?", 41, 4),
    ("How many shapes are there?", 42, 7),
    ("Is there a blue triangle?", 43, 8),
    ("What is a triangle?", None, 4),
    ("Where is the circle?", 44, 4),
]


def _prompt(question: str, seed: int | None) -> dict:
    if seed is None:
        return {"prompt": f"USER: {question} ASSISTANT:"}
    return {
        "prompt": f"USER: <image>\n{question} ASSISTANT:",
        "multi_modal_data": {"image": make_test_image(seed)},
    }


def _params(k: int):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args={"vtw_k": k}
    )


def _engine(speculative: bool):
    from vllm import LLM

    from vtw_vllm.child_engine import in_process_engine_core

    in_process_engine_core()
    spec = {"speculative_config": SPEC} if speculative else {}
    return LLM(
        model=MODEL,
        hf_overrides=OVERRIDES,
        block_size=32,
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=64 * 2**20,
        enforce_eager=True,
        seed=0,
        **spec,
    )


def _generate(llm) -> list[list[int]]:
    outputs = llm.generate(
        [_prompt(q, s) for q, s, _ in REQUESTS], [_params(k) for *_, k in REQUESTS]
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


def _blocks_disagree(sched, req_id: str, k: int) -> bool:
    """No token count T in [computed, computed + 1 + drafts] for which every KV group
    holds ``ceil(kept(T) / block_size)`` blocks (the slots of rejected drafts stay
    allocated, so T may lie past the computed tokens)."""
    request = sched.requests[req_id]
    block_size = sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    ranges, n = vision_ranges(request.mm_features), request.num_computed_tokens
    candidates = set(range(n, n + NUM_SPEC + 2))
    for manager in sched.kv_cache_manager.coordinator.single_type_managers:
        withdrawn = manager.kv_cache_spec.first_layer >= k
        blocks = len(manager.req_to_blocks[req_id])
        candidates &= {
            t
            for t in range(n, n + NUM_SPEC + 2)
            if math.ceil((kept_tokens(ranges, t) if withdrawn else t) / block_size) == blocks
        }
    return not candidates


def speculation_child() -> dict:
    """Everything the tests read, from engines in this (child) process."""
    from vllm.exceptions import VLLMValidationError

    from vtw_vllm.child_engine import scheduler

    plain_llm = _engine(speculative=False)
    result = {"plain": _generate(plain_llm)}
    plain_llm.llm_engine.engine_core.shutdown()
    del plain_llm

    llm = _engine(speculative=True)
    result["batch"] = _generate(llm)
    engine, sched = llm.llm_engine, scheduler(llm)
    free_at_start = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    ks = {}
    for i, (question, seed, k) in enumerate(REQUESTS):
        engine.add_request(f"spec{i}", _prompt(question, seed), _params(k))
        ks[f"spec{i}"] = k
    tokens, stepped, accepted_steps, checked, disagree = {}, {}, 0, 0, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            gained = len(out.outputs[0].token_ids) - tokens.get(out.request_id, 0)
            accepted_steps += gained > 1
            tokens[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                stepped[out.request_id] = list(out.outputs[0].token_ids)
        for req_id in sched.requests:
            if _blocks_disagree(sched, req_id, ks[req_id.split("-")[0]]):
                disagree.append((req_id, sched.requests[req_id].num_computed_tokens))
            checked += 1
    result |= {
        "stepped": [stepped[f"spec{i}"] for i in range(len(REQUESTS))],
        "accepted_steps": accepted_steps,
        "checked": checked,
        "disagree": disagree,
        "blocks_back": sched.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start,
    }
    question, seed, _ = REQUESTS[0]
    try:
        llm.generate(_prompt(question, seed), _params(3))
        result["bad_k_error"] = None
    except VLLMValidationError as e:
        result["bad_k_error"] = str(e)
    (out,) = llm.generate(_prompt(question, seed), _params(4))
    result["after_bad_k_tokens"] = len(out.outputs[0].token_ids)
    return result


@pytest.fixture(scope="module")
def run() -> dict:
    from conftest import ENGINE_STARTS  # here: the child process has no conftest

    start = time.monotonic()
    result = run_child(f"{Path(__file__).resolve()}:speculation_child")
    ENGINE_STARTS.append(
        ("child process", "vqa-tiny: 2 engines, the whole run", time.monotonic() - start)
    )
    return result


def test_greedy_outputs_equal_without_speculation(run):
    for (_, seed, k), spec, plain in zip(REQUESTS, run["batch"], run["plain"], strict=True):
        assert spec == plain, f"image {seed}, K={k}"
    # and the plain engine is VTW itself: one request against the reference
    question, seed, k = REQUESTS[0]
    prompt = _prompt(question, seed)["prompt"]
    ref = vtw_generate(MODEL, prompt, [make_test_image(seed)], k, MAX_TOKENS)
    assert run["plain"][0] == ref.token_ids


def test_drafts_accepted_and_blocks_follow_formula(run):
    """Step by step: some request gains several tokens in one step (drafts accepted);
    every KV group's blocks follow the kept-token formula for one token count shared
    by all groups; the outputs still equal the plain run; every block back."""
    assert run["accepted_steps"] > 0, "no draft was ever accepted"
    assert run["checked"] > 20
    assert not run["disagree"], run["disagree"]
    assert run["stepped"] == run["plain"]
    assert run["blocks_back"]


def test_bad_k_is_rejected_with_speculation(run):
    """vLLM refuses custom logits processors with speculative decoding, so VTW's
    ``vtw_k`` check runs only where the request is rendered: still a clear error, and
    the engine keeps serving."""
    assert run["bad_k_error"] and "vtw_k must be an integer in [1, 4, 7, 8]" in run["bad_k_error"]
    assert run["after_bad_k_tokens"] == MAX_TOKENS
