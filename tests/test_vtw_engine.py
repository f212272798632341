"""VTW on the real vLLM engine (CPU) against stock vLLM and the transformers reference.

One VTW engine per fixture with ``vtw_allowed_k`` [1, 4, 7] (K = 1, N/2, N-1 and N), so a
single engine serves every K tested through ``SamplingParams.extra_args``. Stock and VTW run
at vLLM's defaults here (torch.compile on, prefix caching on), not eager. The stock engine
runs in-process; the VTW engine in its own engine-core process, as ``LLM`` runs by default
(a bad request that bypasses the front end must become an error output there). The
LLaVA-NeXT engine is eager: its compiled path is the same layer-span code as LLaVA's.
"""

import os

import pytest
from conftest import assert_close, first_logprobs, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.reference import vtw_generate

pytestmark = pytest.mark.engine
NUM_LAYERS = 8
ALLOWED_K = [1, NUM_LAYERS // 2, NUM_LAYERS - 1]  # and N: 4 KV groups, 4 compiled spans
MAX_TOKENS = 6
# (prompt, image seeds, image size): images at different offsets, two images, no image.
REQUESTS = [
    ("USER: <image>\nWhat is in the picture? ASSISTANT:", [0], (336, 336)),
    (
        "A chat between a curious user and an artificial intelligence assistant. "
        "USER: <image>\nDescribe the colours and the shapes, left to right. ASSISTANT:",
        [1],
        (640, 480),
    ),
    ("USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:", [2, 3], (336, 336)),
    ("USER: Tell me a short story about a red triangle. ASSISTANT:", [], None),
    ("USER: Look at this <image> and say what it shows. ASSISTANT:", [4], (300, 800)),
]


def _prompt(i: int) -> dict:
    text, seeds, size = REQUESTS[i]
    prompt = {"prompt": text}
    if seeds:
        images = [make_test_image(s, size=size) for s in seeds]
        prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    return prompt


def _params(k: int | None = None):
    from vllm import SamplingParams

    extra = None if k is None else {"vtw_k": k}
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=-1, extra_args=extra)


def _generate(llm, indices: list[int], ks: list[int | None]):
    return llm.generate([_prompt(i) for i in indices], [_params(k) for k in ks])


# vLLM's defaults: compiled (inductor on CPU), not the eager mode of ENGINE_DEFAULTS.
COMPILED = dict(enforce_eager=False)


def _engine_args(arch: str) -> dict:
    return dict(
        hf_overrides={"architectures": [arch], "vtw_allowed_k": ALLOWED_K},
        limit_mm_per_prompt={"image": 2},
        **COMPILED,
    )


@pytest.fixture(scope="module")
def llava_dir() -> str:
    return str(get_fixture("llava"))


@pytest.fixture(scope="module")
def stock_outputs(llava_dir):
    with vllm_engine(llava_dir, limit_mm_per_prompt={"image": 2}, **COMPILED) as llm:
        return _generate(llm, list(range(len(REQUESTS))), [None] * len(REQUESTS))


@pytest.fixture(scope="module")
def vtw_llava(llava_dir, stock_outputs):  # after the stock engine is gone
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # LLM.apply_model in a test
    args = _engine_args("LlavaVTWForConditionalGeneration")
    with vllm_engine(llava_dir, multiprocess=True, **args) as llm:
        yield llm


def test_k_equals_n_is_stock(vtw_llava, stock_outputs):
    indices = list(range(len(REQUESTS)))
    for ks in ([None] * len(indices), [NUM_LAYERS] * len(indices)):
        for out, ref in zip(_generate(vtw_llava, indices, ks), stock_outputs, strict=True):
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
            assert_close(first_logprobs(out), first_logprobs(ref), atol=1e-4, what="logprobs")


@pytest.mark.parametrize("k", [1, NUM_LAYERS // 2, NUM_LAYERS - 1])
def test_matches_reference(vtw_llava, llava_dir, k):
    indices = list(range(len(REQUESTS)))
    outputs = _generate(vtw_llava, indices, [k] * len(indices))
    for i, out in zip(indices, outputs, strict=True):
        text, seeds, size = REQUESTS[i]
        images = [make_test_image(s, size=size) for s in seeds]
        ref = vtw_generate(llava_dir, text, images, k, MAX_TOKENS)
        assert out.prompt_token_ids == ref.prompt_token_ids
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"request {i}, K={k}"
        vllm_lp = first_logprobs(out)
        assert_close(vllm_lp, ref.first_logprobs[: len(vllm_lp)], atol=1e-3, what=f"req {i}")


def test_vtw_changes_image_requests_only(vtw_llava, stock_outputs):
    outputs = _generate(vtw_llava, [0, 3], [1, 1])
    assert outputs[0].outputs[0].token_ids != stock_outputs[0].outputs[0].token_ids
    assert outputs[1].outputs[0].token_ids == stock_outputs[3].outputs[0].token_ids


def test_mixed_k_batch_equals_solo_runs(vtw_llava):
    indices, ks = [0, 1, 2, 3, 4, 0], [4, 1, NUM_LAYERS, 7, 4, 1]
    batch = _generate(vtw_llava, indices, ks)
    for i, k, out in zip(indices, ks, batch, strict=True):
        (solo,) = _generate(vtw_llava, [i], [k])
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids, f"request {i}, K={k}"
        assert_close(first_logprobs(out), first_logprobs(solo), atol=1e-4, what="logprobs")


def _group_starts(model) -> list[int]:
    layers = model.language_model.model.layers
    return sorted({layer.self_attn.attn.vtw_first_layer for layer in layers})


def test_llava_next_matches_reference():
    model_dir = str(get_fixture("llava_next"))
    indices = [0, 1, 3]  # anyres: 336x336 -> 1176 and 640x480 -> 2340 vision tokens
    ks = [2, NUM_LAYERS // 2, NUM_LAYERS]
    args = _engine_args("LlavaNextVTWForConditionalGeneration")
    args["hf_overrides"] = {  # the deployment names its K values: 3 KV groups, not 8
        "architectures": ["LlavaNextVTWForConditionalGeneration"],
        "vtw_allowed_k": [2, NUM_LAYERS // 2],
    }
    args["enforce_eager"] = True  # the compiled spans are checked on the LLaVA engine
    with vllm_engine(model_dir, **args) as llm:
        assert llm.apply_model(_group_starts) == [[0, 2, 4]]
        outputs = _generate(llm, indices * len(ks), [k for k in ks for _ in indices])
    for j, out in enumerate(outputs):
        i, k = indices[j % len(indices)], ks[j // len(indices)]
        text, seeds, size = REQUESTS[i]
        ref = vtw_generate(model_dir, text, [make_test_image(s, size=size) for s in seeds], k, 6)
        assert out.prompt_token_ids == ref.prompt_token_ids
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"request {i}, K={k}"


def _compile_state(model) -> dict:
    from torch._dynamo.utils import counters

    spans = model._vtw_spans  # one vLLM @support_torch_compile unit per KV layer group
    return {
        "spans": [(span.start, len(span.layers)) for span in spans],
        "compiled": [
            not span.do_not_compile
            and (span.compiled or getattr(span, "aot_compiled_fn", None) is not None)
            for span in spans
        ],
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        **model.vtw_forward_counts,
    }


def test_compiled_path_is_taken(vtw_llava):
    """Every step runs vLLM-compiled layer spans, one per KV layer group: steps with a
    withdrawal on fewer rows after the gather, steps without one back to back; new row
    counts do not recompile. The engine is not eager."""
    assert vtw_llava.llm_engine.vllm_config.model_config.enforce_eager is False
    (before,) = vtw_llava.apply_model(_compile_state)
    _generate(vtw_llava, [0, 3], [4, 4])  # image prefill withdraws; text + decode do not
    (after,) = vtw_llava.apply_model(_compile_state)
    assert before["spans"] == [(0, 1), (1, 3), (4, 3), (7, 1)], before  # one per KV group
    assert all(before["compiled"]), before
    assert after["dynamo_graphs"] == before["dynamo_graphs"] > 0, (before, after)
    assert after["withdrawal"] > before["withdrawal"]
    assert after["full"] >= before["full"] + MAX_TOKENS - 1  # every decode step


def test_bad_k_past_the_front_end_fails_that_request_alone(vtw_llava):
    """A request that reaches the engine process without the front end's checks (a
    second API server, a direct engine-core client) with a bad vtw_k gets an error
    output of its own; the engine keeps serving."""
    from vllm.v1.engine import FinishReason

    engine = vtw_llava.llm_engine
    request = engine.input_processor.process_inputs(
        "direct-bad-k", _prompt(0), _params(4), ("generate",)
    )
    request.sampling_params.extra_args = {"vtw_k": 99}
    engine.engine_core.add_request(request)
    outputs = engine.engine_core.get_output().outputs
    assert [(o.request_id, o.finish_reason) for o in outputs] == [
        ("direct-bad-k", FinishReason.ERROR)
    ]
    (good,) = _generate(vtw_llava, [0], [4])
    assert len(good.outputs[0].token_ids) == MAX_TOKENS
