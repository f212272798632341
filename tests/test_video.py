"""VTW for the video-capable LLaVA family on the real vLLM engine (CPU).

LLaVA-NeXT-Video (Llama; one video per prompt, vLLM serves no images for it) and
LLaVA-OneVision (Qwen2; images and videos, together in one prompt too, and two images in one
prompt), on their tiny fixtures. Every position of an image or video placeholder is
withdrawn at K (pooled frame tokens, OneVision's newline after a video and its image
newline rows). Per model: one stock engine and one VTW engine
(``vtw_layer_group_size=1``: every K), both eager with a small KV cache; K = N equals
stock, K < N equals the transformers reference, and a batch of mixed K equals its
requests run alone.
"""

import math

import pytest
from conftest import assert_close, first_logprobs, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image, make_test_video
from vtw_vllm.testing.reference import vtw_generate
from vtw_vllm.vision_ranges import kept_tokens, vision_ranges

pytestmark = pytest.mark.engine
NUM_LAYERS = 8
MAX_TOKENS = 6
TEXT_ONLY = ("USER: Tell me a short story about a red triangle. ASSISTANT:", {})

# (prompt, media): media maps "image" to [(seed, size), ...] and "video" to
# (seed, frames, size).
MODELS = {
    "llava_next_video": {
        "arch": "LlavaNextVideoVTWForConditionalGeneration",
        "limit": {"video": 1},
        "requests": [
            ("USER: <video>\nWhat happens in the video? ASSISTANT:", {"video": (0, 4, (336, 336))}),
            (
                "A chat between a curious user and an artificial intelligence assistant. "
                "USER: <video>\nDescribe the motion, frame by frame. ASSISTANT:",
                {"video": (1, 6, (640, 480))},  # resized and centre-cropped to 336: 864 tokens
            ),
            TEXT_ONLY,
        ],
    },
    "llava_onevision": {
        "arch": "LlavaOnevisionVTWForConditionalGeneration",
        "limit": {"image": 2, "video": 1},
        "requests": [
            ("USER: <video>\nWhat happens in the video? ASSISTANT:", {"video": (0, 4, (336, 336))}),
            (
                "USER: <image>\n<video>\nDoes the video show the picture? ASSISTANT:",
                {"image": [(2, (384, 384))], "video": (3, 3, (384, 384))},  # 1485 + 589 tokens
            ),
            TEXT_ONLY,
            (
                "USER: <image>\n<image>\nWhich picture has more shapes? ASSISTANT:",
                {"image": [(4, (336, 336)), (5, (336, 336))]},  # two images, each anyres
            ),
        ],
    },
}


def _media(spec: dict) -> tuple[list, list]:
    images = [make_test_image(seed, size=size) for seed, size in spec.get("image", [])]
    videos = []
    if "video" in spec:
        seed, frames, size = spec["video"]
        videos = [make_test_video(seed, num_frames=frames, size=size)]
    return images, videos


def _prompt(kind: str, i: int) -> dict:
    return _request(*MODELS[kind]["requests"][i])


def _request(text: str, spec: dict) -> dict:
    images, videos = _media(spec)
    prompt = {"prompt": text}
    data = {}
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    if videos:
        data["video"] = videos[0]
    if data:
        prompt["multi_modal_data"] = data
    return prompt


def _params(k: int | None = None):
    from vllm import SamplingParams

    extra = None if k is None else {"vtw_k": k}
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=-1, extra_args=extra)


def _generate(llm, kind: str, indices: list[int], ks: list[int | None]):
    return llm.generate([_prompt(kind, i) for i in indices], [_params(k) for k in ks])


def test_video_kv_blocks_follow_formula_and_return():
    """OneVision, image + video and video-only requests at K=4 (KV groups [0, 4) and
    [4, 8)), chunked prefill: at every step the deep group holds blocks for the text
    tokens only, the shallow group for every token; every block returns to the pool; the
    tokens equal the reference; a request aborted mid-prefill returns its blocks too. Once
    a request is decoding, every running request is preempted (vLLM's
    ``_preempt_request``, through ``reset_prefix_cache(reset_running_requests=True)``,
    which also empties the prefix cache) and recomputes its video from token 0.
    (First in the module: no other engine is alive.)"""
    kind, block_size, k = "llava_onevision", 32, 4  # CPU_ATTN needs multiples of 32
    model_dir = str(get_fixture(kind))
    overrides = {"architectures": [MODELS[kind]["arch"]], "vtw_k": k, "vtw_allowed_k": [k]}
    with vllm_engine(
        model_dir,
        limit_mm_per_prompt=MODELS[kind]["limit"],
        hf_overrides=overrides,
        block_size=block_size,
        max_num_batched_tokens=512,  # chunked prefill through the image and the video
        kv_cache_memory_bytes=32 * 2**20,
    ) as llm:
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        pool = sched.kv_cache_manager.block_pool
        managers = sched.kv_cache_manager.coordinator.single_type_managers
        assert sorted(m.kv_cache_spec.first_layer for m in managers) == [0, k]
        free_at_start = pool.get_num_free_blocks()
        for j, i in enumerate((0, 1, 0)):
            llm.llm_engine.add_request(f"r{i}-{j}", _prompt(kind, i), _params())
        llm.llm_engine.add_request("aborted", _prompt(kind, 1), _params())  # image + video
        outputs, checked, aborted_at, preempted = {}, 0, None, set()
        while llm.llm_engine.has_unfinished_requests():
            computed = [r.num_computed_tokens for i, r in sched.requests.items() if "abort" in i]
            if aborted_at is None and computed and computed[0] > 0:  # mid-prefill
                llm.llm_engine.abort_request(["aborted"])
                aborted_at = computed[0]
            decoding = [r for r in sched.running if r.num_output_tokens >= 2]
            if not preempted and decoding:  # vLLM's preemption of every running request
                assert llm.llm_engine.reset_prefix_cache(reset_running_requests=True)
                preempted = {r.request_id for r in sched.requests.values() if r.num_preemptions}
                assert decoding[0].request_id in preempted
            for out in llm.llm_engine.step():
                if out.finished and out.request_id != "aborted":
                    outputs[out.request_id] = out
            for req_id, request in sched.requests.items():
                ranges = vision_ranges(request.mm_features)
                assert ranges, req_id
                n = request.num_computed_tokens
                for manager in managers:
                    deep = manager.kv_cache_spec.first_layer >= k
                    held = kept_tokens(ranges, n) if deep else n
                    blocks = len(manager.req_to_blocks[req_id])
                    assert blocks == math.ceil(held / block_size), (req_id, n, deep)
                    checked += 1
        assert checked > 20
        assert aborted_at is not None and not any("abort" in i for i in sched.requests)
        assert len(preempted) >= 2  # a video request mid-decode, another mid-prefill at least
        assert pool.get_num_free_blocks() == free_at_start
    for req_id, out in outputs.items():
        text, spec = MODELS[kind]["requests"][int(req_id[1])]
        images, videos = _media(spec)
        ref = vtw_generate(model_dir, text, images, k, MAX_TOKENS, videos=videos)
        assert list(out.outputs[0].token_ids) == ref.token_ids, req_id


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    """(kind, model dir, stock outputs, VTW engine): the stock engine is gone before the
    VTW engine starts; one model's engines are gone before the next model's start."""
    kind = request.param
    model_dir = str(get_fixture(kind))
    limit = MODELS[kind]["limit"]
    indices = list(range(len(MODELS[kind]["requests"])))
    with vllm_engine(model_dir, limit_mm_per_prompt=limit) as llm:
        # One request at a time: stock vLLM 0.32's OneVision dies when two videos of
        # different frame counts share an encoder step (see the test below).
        stock = [_generate(llm, kind, [i], [None])[0] for i in indices]
    overrides = {"architectures": [MODELS[kind]["arch"]], "vtw_layer_group_size": 1}
    with vllm_engine(model_dir, limit_mm_per_prompt=limit, hf_overrides=overrides) as llm:
        yield kind, model_dir, stock, llm


def test_k_equals_n_is_stock(model):
    kind, _, stock, llm = model
    indices = list(range(len(stock)))
    for ks in ([None] * len(indices), [NUM_LAYERS] * len(indices)):
        for out, ref in zip(_generate(llm, kind, indices, ks), stock, strict=True):
            assert out.prompt_token_ids == ref.prompt_token_ids
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids, (kind, ks)
            assert_close(first_logprobs(out), first_logprobs(ref), atol=1e-4, what=kind)


@pytest.mark.parametrize("k", [2, NUM_LAYERS - 2])
def test_matches_reference(model, k):
    kind, model_dir, _, llm = model
    requests = MODELS[kind]["requests"]
    indices = [i for i, (_, spec) in enumerate(requests) if spec]  # the vision requests
    outputs = _generate(llm, kind, indices, [k] * len(indices))
    for i, out in zip(indices, outputs, strict=True):
        text, spec = requests[i]
        images, videos = _media(spec)
        ref = vtw_generate(model_dir, text, images, k, MAX_TOKENS, videos=videos)
        assert out.prompt_token_ids == ref.prompt_token_ids
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"{kind} request {i}, K={k}"
        vllm_lp = first_logprobs(out)
        assert_close(vllm_lp, ref.first_logprobs[: len(vllm_lp)], atol=1e-3, what=f"{kind} {i}")


def test_vtw_changes_vision_requests_only(model):
    kind, _, stock, llm = model
    indices = list(range(len(stock)))
    outputs = _generate(llm, kind, indices, [1] * len(indices))
    for i, out in zip(indices, outputs, strict=True):
        diff = (first_logprobs(out) - first_logprobs(stock[i])).abs().max().item()
        if MODELS[kind]["requests"][i][1]:
            assert diff > 1e-2, f"{kind} request {i}: withdrawal at K=1 changed nothing"
        else:
            assert diff <= 1e-4, f"{kind} request {i}: a text-only request changed"
            assert out.outputs[0].token_ids == stock[i].outputs[0].token_ids


def test_mixed_k_batch_equals_solo_runs(model):
    kind, _, _, llm = model
    indices, ks = [0, 1, 2, 0, 1], [2, 5, 3, NUM_LAYERS, 7]
    batch = _generate(llm, kind, indices, ks)
    for i, k, out in zip(indices, ks, batch, strict=True):
        (solo,) = _generate(llm, kind, [i], [k])
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids, f"{kind} request {i}, K={k}"
        assert_close(first_logprobs(out), first_logprobs(solo), atol=1e-4, what="logprobs")


# Two videos of 4 and 3 frames that no other test sends (no prefix or encoder cache hit).
TWO_VIDEOS = [
    ("USER: <video>\nWhat happens in the video? ASSISTANT:", {"video": (7, 4, (336, 336))}),
    ("USER: <video>\nDescribe the motion. ASSISTANT:", {"video": (6, 3, (336, 336))}),
]


def test_two_videos_of_different_frame_counts_in_one_encoder_step(model):
    """vLLM 0.32's LLaVA-OneVision returns ``[1, n, d]`` per video when one encoder step
    holds videos of different frame counts (``[n, d]`` when the counts are equal), and the
    engine dies in ``sanity_check_mm_encoder_outputs``: stock vLLM 0.32 has this defect.
    The VTW class returns one 2-D tensor per video. Here two such videos are scheduled in
    ONE step, every time (read from the scheduler, not left to chance), and both answers
    equal the reference."""
    kind, model_dir, _, llm = model
    k = 2
    requests = TWO_VIDEOS
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    encoder_steps = []
    schedule = sched.schedule

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        encoder_steps.append(sorted(output.scheduled_encoder_inputs))
        return output

    sched.schedule = recording_schedule
    try:
        outputs = llm.generate([_request(*r) for r in requests], [_params(k)] * 2)
    finally:
        del sched.schedule  # back to the class's method
    assert [len(ids) for ids in encoder_steps if ids] == [2], encoder_steps  # one step, both
    for (text, spec), out in zip(requests, outputs, strict=True):
        images, videos = _media(spec)
        ref = vtw_generate(model_dir, text, images, k, MAX_TOKENS, videos=videos)
        assert list(out.outputs[0].token_ids) == ref.token_ids, (kind, text)
