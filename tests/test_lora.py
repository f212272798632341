"""LoRA adapters with VTW (``enable_lora``), on the real engine (CPU: vLLM's
``PunicaWrapperCPU``; vLLM turns compilation off for LoRA on CPU).

Two rank-8 adapters with random but fixed weights on the language model's q/v
projections, built here (``vtw_vllm.testing.lora``), each with a merged twin checkpoint
for the transformers reference. ``max_loras`` is 3, above the 2 adapters in use: vLLM
0.32's CPU LoRA path reads the "no adapter" index -1 as the last adapter slot, so with
every slot taken a request without an adapter would get the last slot's adapter (a stock
defect, seen without VTW too).
"""

import pytest
from conftest import assert_close, first_logprobs, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.lora import build_lora_pair
from vtw_vllm.testing.reference import vtw_generate

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
ARCH = "LlavaVTWForConditionalGeneration"
MAX_TOKENS = 6
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
LORA = dict(enable_lora=True, max_loras=3, max_lora_rank=8, limit_mm_per_prompt={"image": 2})


@pytest.fixture(scope="module")
def llava_dir() -> str:
    return str(get_fixture("llava"))


@pytest.fixture(scope="module")
def adapters(llava_dir, tmp_path_factory) -> dict[int, tuple]:
    """adapter id -> (LoRARequest, merged checkpoint dir)."""
    from vllm.lora.request import LoRARequest

    out = tmp_path_factory.mktemp("lora")
    pairs = {i: build_lora_pair(llava_dir, out, seed=i) for i in (1, 2)}
    return {i: (LoRARequest(f"adapter{i}", i, str(a)), str(m)) for i, (a, m) in pairs.items()}


@pytest.fixture(scope="module")
def stock_outputs(llava_dir, adapters):
    """Stock vLLM with each adapter (and none): the K = N baseline."""
    with vllm_engine(llava_dir, **LORA) as llm:
        return {i: _generate(llm, [(10, i)], adapters, None)[0] for i in (None, 1, 2)}


@pytest.fixture(scope="module")
def vtw(llava_dir, stock_outputs):  # after the stock engine is gone
    overrides = {"architectures": [ARCH], "vtw_allowed_k": [1, 4, 7]}
    with vllm_engine(llava_dir, hf_overrides=overrides, **LORA) as llm:
        yield llm


def _generate(llm, requests: list[tuple[int, int | None]], adapters, ks):
    """``requests``: (image seed, adapter id or None); ``ks``: one K per request or None."""
    from vllm import SamplingParams

    ks = ks or [None] * len(requests)
    prompts = [
        {"prompt": PROMPT, "multi_modal_data": {"image": make_test_image(s)}} for s, _ in requests
    ]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            logprobs=-1,
            extra_args=None if k is None else {"vtw_k": k},
        )
        for k in ks
    ]
    loras = [None if a is None else adapters[a][0] for _, a in requests]
    return llm.generate(prompts, params, lora_request=loras)


def test_k_equals_n_with_adapter_is_stock(vtw, adapters, stock_outputs):
    for adapter in (None, 1, 2):
        (out,) = _generate(vtw, [(10, adapter)], adapters, [8])
        ref = stock_outputs[adapter]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, f"adapter {adapter}"
        assert_close(first_logprobs(out), first_logprobs(ref), atol=1e-4, what="logprobs")
    # the adapters change this tiny model's answer (else the tests below prove little)
    assert stock_outputs[1].outputs[0].token_ids != stock_outputs[None].outputs[0].token_ids


@pytest.mark.parametrize("k", [1, 4, 7])
def test_adapter_at_k_equals_reference_on_merged_weights(vtw, adapters, llava_dir, k):
    requests = [(11, 1), (12, 2), (13, None)]
    outputs = _generate(vtw, requests, adapters, [k] * len(requests))
    for (seed, adapter), out in zip(requests, outputs, strict=True):
        model_dir = llava_dir if adapter is None else adapters[adapter][1]
        ref = vtw_generate(model_dir, PROMPT, [make_test_image(seed)], k, MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"adapter {adapter}, K={k}"
        lp = first_logprobs(out)
        assert_close(lp, ref.first_logprobs[: len(lp)], atol=1e-3, what=f"adapter {adapter}")


def test_mixed_adapters_and_k_equal_solo_runs(vtw, adapters):
    """Two adapters and none, each at several K, in one batch (so one step withdraws rows
    of requests with different adapters): each equals its solo run; every block back."""
    sched = vtw.llm_engine.engine_core.engine_core.scheduler
    free_at_start = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    requests = [(20, 1), (21, None), (22, 2), (23, 1), (24, 2), (25, None)]
    ks = [1, 4, 7, 4, 1, 8]
    batch = _generate(vtw, requests, adapters, ks)
    for request, k, out in zip(requests, ks, batch, strict=True):
        (solo,) = _generate(vtw, [request], adapters, [k])
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids, f"{request}, K={k}"
        assert_close(first_logprobs(out), first_logprobs(solo), atol=1e-4, what="logprobs")
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start
