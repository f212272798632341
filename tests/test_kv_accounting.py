"""Deep-layer KV holds no vision tokens: blocks per layer group follow the formula at
every step for every allowed K, and every block returns to the pool. In-process engine,
scheduler inspected between steps; deployment-wide default K=4 through ``hf_overrides``,
layer groups of 2 (allowed K: 2, 4, 6, 8), per-request K through ``extra_args``.

The engine runs at tensor parallel size 2 (two worker processes over gloo, one KV head
each), so everything here is also the TP test: chunked prefill with a vision-only chunk,
preemption and resumed requests (whose resent image data crosses to both workers), aborts,
bad K, every block back, tokens equal to the single-process reference.

The KV budget (191 usable blocks of 32 tokens x 2 layers, 3 MiB per worker) holds the
six requests (four with an image) at K <= 4 (<= 40 blocks per image request) but not at
K = 6 (58) or 8 (76): the K = 8 run goes through preemption and recompute."""

import math

import pytest
from conftest import environment, needs_ranks, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.reference import vtw_generate
from vtw_vllm.vision_ranges import kept_tokens, vision_ranges

# A hung rank fails the test instead of stalling CI (pytest-timeout).
pytestmark = [pytest.mark.engine, pytest.mark.timeout(600), needs_ranks(2)]
K, BLOCK_SIZE, MAX_TOKENS = 4, 32, 5  # CPU_ATTN needs multiples of 32


@pytest.fixture(scope="module")
def engine():
    with (
        environment(VLLM_CPU_OMP_THREADS_BIND="0|1"),  # one core per rank on a 2-core box
        vllm_engine(
            str(get_fixture("llava")),
            tensor_parallel_size=2,
            hf_overrides={
                "architectures": ["LlavaVTWForConditionalGeneration"],
                "vtw_k": K,
                "vtw_layer_group_size": 2,
            },
            block_size=BLOCK_SIZE,
            max_num_batched_tokens=256,  # chunked prefill: one chunk holds only vision tokens
            kv_cache_memory_bytes=3 * 2**20,  # per worker, whose blocks hold half the KV heads
            max_model_len=1024,
        ) as llm,
    ):
        yield llm


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _prompts():
    return [
        {
            "prompt": "USER: <image>\nWhat is it? ASSISTANT:",
            "multi_modal_data": {"image": make_test_image(7)},
        },
        {
            "prompt": "Hello there, a somewhat longer text before the picture. USER: <image>\n"
            "Describe it in detail please. ASSISTANT:",
            "multi_modal_data": {"image": make_test_image(8)},
        },
        {"prompt": "USER: No picture here, only text. ASSISTANT:"},
    ]


def _params(k: int | None = None):
    from vllm import SamplingParams

    extra = None if k is None else {"vtw_k": k}
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)


def test_groups_are_layer_blocks(engine):
    groups = _scheduler(engine).kv_cache_config.kv_cache_groups
    starts = sorted(g.kv_cache_spec.first_layer for g in groups)
    assert starts == [0, 2, 4, 6]
    assert all(len(g.layer_names) == 2 for g in groups)


@pytest.mark.parametrize("k", [2, None, 6, 8])  # None: the deployment default K=4
def test_blocks_follow_formula_every_step_and_return(engine, k):
    sched = _scheduler(engine)
    pool = sched.kv_cache_manager.block_pool
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    free_at_start = pool.get_num_free_blocks()
    prompts = _prompts() * 2
    for i, prompt in enumerate(prompts):
        engine.llm_engine.add_request(f"k{k}-r{i}", prompt, _params(k))
    request_k = K if k is None else k

    outputs, checked, saw_vision_only_chunk, preempted = {}, 0, False, set()
    while engine.llm_engine.has_unfinished_requests():
        for out in engine.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = out
        for req_id, request in sched.requests.items():
            if request.num_preemptions:
                preempted.add(req_id)
            ranges = vision_ranges(request.mm_features)
            n = request.num_computed_tokens
            if ranges and n == 512:  # the chunk [256, 512) was vision tokens only
                saw_vision_only_chunk = True
            for manager in managers:
                withdrawn = manager.kv_cache_spec.first_layer >= request_k
                held = kept_tokens(ranges, n) if withdrawn else n
                assert len(manager.req_to_blocks[req_id]) == math.ceil(held / BLOCK_SIZE), (
                    f"{req_id} layer group {manager.kv_cache_spec.first_layer} at {n} tokens"
                )
                checked += 1
    assert checked > 40 and saw_vision_only_chunk
    if request_k == 8:  # K=6 waits at admission instead; K=8 is admitted and preempted
        assert preempted
    assert pool.get_num_free_blocks() == free_at_start

    # Chunked prefill, preemption, per-request or default K: still the reference's tokens.
    model_dir = str(get_fixture("llava"))
    for i, prompt in enumerate(_prompts()[:2]):
        image = prompt["multi_modal_data"]["image"]
        ref = vtw_generate(model_dir, prompt["prompt"], [image], request_k, MAX_TOKENS)
        for req_id in (f"k{k}-r{i}", f"k{k}-r{i + 3}"):  # the same request, twice in the batch
            assert list(outputs[req_id].outputs[0].token_ids) == ref.token_ids, req_id


def test_bad_k_is_rejected_offline_without_leaking(engine):
    from vllm.exceptions import VLLMValidationError

    pool = _scheduler(engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    for bad in (-1, 0, 3, 9, "4", 4.0, True):
        with pytest.raises(
            VLLMValidationError, match=r"vtw_k must be an integer in \[2, 4, 6, 8\]"
        ):
            engine.generate(_prompts()[0], _params(bad))
    (good,) = engine.generate(_prompts()[0], _params(2))
    assert len(good.outputs[0].token_ids) == MAX_TOKENS
    assert pool.get_num_free_blocks() == free_at_start


def test_rejected_request_leaves_the_mm_cache_consistent(engine):
    """The multimodal processor cache stays on with VTW (vLLM's default); a request
    rejected after rendering must not leave its image marked as sent to the engine."""
    model_config = engine.llm_engine.vllm_config.model_config
    assert model_config.multimodal_config.mm_processor_cache_gb > 0
    from vllm.exceptions import VLLMValidationError

    prompt = {
        "prompt": "USER: <image>\nWhat is it? ASSISTANT:",
        "multi_modal_data": {"image": make_test_image(99)},  # no other test sends it
    }
    with pytest.raises(VLLMValidationError):
        engine.generate(prompt, _params(3))
    ref = vtw_generate(str(get_fixture("llava")), prompt["prompt"], [make_test_image(99)], 2, 5)
    for _ in range(2):
        (out,) = engine.generate(prompt, _params(2))
        assert list(out.outputs[0].token_ids) == ref.token_ids


def test_aborted_requests_return_every_block(engine):
    sched = _scheduler(engine)
    pool = sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    for i, prompt in enumerate(_prompts()):
        engine.llm_engine.add_request(f"a{i}", prompt, _params())
    for _ in range(3):
        engine.llm_engine.step()
    assert pool.get_num_free_blocks() < free_at_start
    engine.llm_engine.abort_request([f"a{i}" for i in range(3)])
    while engine.llm_engine.has_unfinished_requests():
        engine.llm_engine.step()
    assert not sched.requests
    assert pool.get_num_free_blocks() == free_at_start


def test_prompts_differing_only_in_their_image(engine):
    """With prefix caching on (vLLM's default, kept by VTW), prompts differing only in
    their image share no block past the image and get their own reference answers."""
    assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching is True
    model_dir = str(get_fixture("llava"))
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    images = [make_test_image(20), make_test_image(21)]
    outputs = engine.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images], _params(2)
    )
    for image, out in zip(images, outputs, strict=True):
        ref = vtw_generate(model_dir, prompt, [image], 2, MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == ref.token_ids


def test_prompt_ending_with_an_image_and_prompt_logprobs(engine):
    """With K < N the last prompt row must be text (it is sampled from) and prompt
    log-probs are undefined on image prompts: both rejected with the cause; K = N and
    text-only prompts are served."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    pool = _scheduler(engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    ends_with_image = {
        "prompt": "USER: What is this? <image>",
        "multi_modal_data": {"image": make_test_image(41)},
    }
    with pytest.raises(VLLMValidationError, match="must not end with an image or video"):
        engine.generate(ends_with_image, _params(2))
    (out,) = engine.generate(ends_with_image, _params(8))  # K = N: no withdrawal
    assert len(out.outputs[0].token_ids) == MAX_TOKENS

    def with_prompt_logprobs(k):
        return SamplingParams(max_tokens=2, prompt_logprobs=1, extra_args={"vtw_k": k})

    with pytest.raises(VLLMValidationError, match="prompt_logprobs"):
        engine.generate(_prompts()[0], with_prompt_logprobs(2))
    (out,) = engine.generate(_prompts()[0], with_prompt_logprobs(8))
    assert out.prompt_logprobs is not None
    (out,) = engine.generate(_prompts()[2], with_prompt_logprobs(2))  # no image
    assert out.prompt_logprobs is not None
    assert pool.get_num_free_blocks() == free_at_start


def test_resumed_request_below_its_first_prefix_hit_runs_its_image_again(engine):
    """vLLM 0.32 sends a new request's worker no data for images its prefix hit covers.
    Preempted, with the prefix cache and the image's encoder output gone, the request
    restarts below the image and its encoder must run again: vLLM's V1 runner alone stops
    the engine here ("Encoder cache miss"); see :mod:`vtw_vllm.resumed_mm_inputs`."""
    llm, sched = engine.llm_engine, _scheduler(engine)
    free_at_start = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    question = " ".join(["Describe every shape in the picture, its colour and place."] * 3)
    first = {
        "prompt": f"USER: <image>\n{question} ASSISTANT:",
        "multi_modal_data": {"image": make_test_image(50)},
    }
    other = {**first, "multi_modal_data": {"image": make_test_image(51)}}
    (alone,) = engine.generate(first, _params())  # its blocks and encoder output stay cached

    def computed(name: str) -> int:  # the engine's request ids carry a suffix
        (request,) = [r for i, r in sched.requests.items() if i.startswith(name)]
        return request.num_computed_tokens

    llm.add_request("resumed", first, _params())
    llm.step()  # a hit past the image: the whole prompt ran in one 256-token step
    assert computed("resumed") == len(alone.prompt_token_ids)
    llm.add_request("evicter", other, _params())
    llm.step()  # its image evicts the first image's encoder output (room for one image)
    assert computed("evicter") > 0
    assert llm.reset_prefix_cache(reset_running_requests=True)  # preempts both
    outputs = {}
    while llm.has_unfinished_requests():
        outputs.update({out.request_id: out for out in llm.step() if out.finished})
    assert sched.requests == {}
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start
    assert outputs["resumed"].outputs[0].token_ids == alone.outputs[0].token_ids
