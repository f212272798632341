"""n-gram speculative decoding with VTW, on the real engine (CPU).

The n-gram proposer drafts from the tokens alone; each verification step schedules the
last token and its drafts as several rows per request, in every KV group (compacted
ones included: those rows are text). Greedy outputs must equal the same VTW engine
without speculation, for mixed K; the proposer must really propose and have drafts
accepted; each KV group's blocks must follow the kept-token formula through rejections,
and every block must return.

The model is the shipped ``checkpoints/vqa-tiny`` (a trained tiny LLaVA): past its
short answer (``ignore_eos``) it repeats itself, so drafts get accepted; the random
fixtures' answers almost never repeat an n-gram.
"""

import math
from pathlib import Path

import pytest
from conftest import vllm_engine

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


@pytest.fixture(scope="module")
def plain_outputs() -> list[list[int]]:
    """The same VTW engine without speculation."""
    with vllm_engine(MODEL, hf_overrides=OVERRIDES, block_size=32) as llm:
        outputs = llm.generate(
            [_prompt(q, s) for q, s, _ in REQUESTS], [_params(k) for *_, k in REQUESTS]
        )
        return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def spec_engine(plain_outputs):  # after the plain engine is gone
    with vllm_engine(MODEL, hf_overrides=OVERRIDES, block_size=32, speculative_config=SPEC) as llm:
        yield llm


def test_greedy_outputs_equal_without_speculation(spec_engine, plain_outputs):
    outputs = spec_engine.generate(
        [_prompt(q, s) for q, s, _ in REQUESTS], [_params(k) for *_, k in REQUESTS]
    )
    for (_, seed, k), out, plain in zip(REQUESTS, outputs, plain_outputs, strict=True):
        assert list(out.outputs[0].token_ids) == plain, f"image {seed}, K={k}"
    # and the plain engine is VTW itself: one request against the reference
    question, seed, k = REQUESTS[0]
    prompt = _prompt(question, seed)["prompt"]
    ref = vtw_generate(MODEL, prompt, [make_test_image(seed)], k, MAX_TOKENS)
    assert plain_outputs[0] == ref.token_ids


def test_drafts_accepted_and_blocks_follow_formula(spec_engine, plain_outputs):
    """Step by step: some request gains several tokens in one step (drafts accepted);
    every KV group's blocks equal ``ceil(kept(T) / block_size)`` for one token count T
    shared by all groups, between the computed tokens and computed + 1 + drafts (the
    slots of rejected drafts stay allocated); every block back at the end."""
    llm = spec_engine.llm_engine
    sched = llm.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    block_size = sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    free_at_start = pool.get_num_free_blocks()
    ks = {}
    for i, (question, seed, k) in enumerate(REQUESTS):
        llm.add_request(f"spec{i}", _prompt(question, seed), _params(k))
        ks[f"spec{i}"] = k
    tokens: dict[str, int] = {}
    accepted_steps, checked, outputs = 0, 0, {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            gained = len(out.outputs[0].token_ids) - tokens.get(out.request_id, 0)
            accepted_steps += gained > 1
            tokens[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        for req_id, request in sched.requests.items():
            k = ks[req_id.split("-")[0]]
            ranges, n = vision_ranges(request.mm_features), request.num_computed_tokens
            candidates = set(range(n, n + NUM_SPEC + 2))
            for manager in managers:
                withdrawn = manager.kv_cache_spec.first_layer >= k
                blocks = len(manager.req_to_blocks[req_id])
                candidates &= {
                    t
                    for t in range(n, n + NUM_SPEC + 2)
                    if math.ceil((kept_tokens(ranges, t) if withdrawn else t) / block_size)
                    == blocks
                }
            assert candidates, f"{req_id}: blocks per group disagree at {n} tokens"
            checked += 1
    assert accepted_steps > 0, "no draft was ever accepted"
    assert checked > 20
    assert [outputs[f"spec{i}"] for i in range(len(REQUESTS))] == plain_outputs
    assert pool.get_num_free_blocks() == free_at_start


def test_bad_k_is_rejected_with_speculation(spec_engine):
    """vLLM refuses custom logits processors with speculative decoding, so VTW's
    ``vtw_k`` check runs only where the request is rendered: still a clear error."""
    from vllm.exceptions import VLLMValidationError

    question, seed, _ = REQUESTS[0]
    with pytest.raises(VLLMValidationError, match=r"vtw_k must be an integer in \[1, 4, 7, 8\]"):
        spec_engine.generate(_prompt(question, seed), _params(3))
    (out,) = spec_engine.generate(_prompt(question, seed), _params(4))
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
