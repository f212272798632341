"""VTW for Qwen2.5-VL on the real vLLM engine (CPU), on the tiny Qwen2.5-VL fixture.

M-RoPE: the model gets positions as [3, tokens]; the rows kept at layer K keep their
original 3-D positions. Which tokens are withdrawn: every ``<|image_pad|>`` /
``<|video_pad|>`` position (vLLM's placeholder ranges); ``<|vision_start|>`` and
``<|vision_end|>`` stay. One stock engine (eager) and one VTW engine at vLLM's defaults
(compiled: the layer spans with M-RoPE positions), ``vtw_layer_group_size=1`` (every K).
K = N equals stock (tokens and log-probs); K < N equals the transformers reference that
drops the vision rows at layer K and keeps the other rows' 3-D positions; a batch of
mixed K equals its requests run alone; text-only requests are untouched.
"""

import pytest
from conftest import assert_close, first_logprobs, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image, make_test_video
from vtw_vllm.testing.qwen_fixtures import video_metadata
from vtw_vllm.testing.reference import vtw_generate

pytestmark = pytest.mark.engine
KIND = "qwen2_5_vl"
ARCH = "Qwen2_5_VLVTWForConditionalGeneration"
NUM_LAYERS = 8
MAX_TOKENS = 6
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


# (prompt, media): media maps "image" to [(seed, size), ...] and "video" to (seed, frames, size).
REQUESTS = [
    (_chat(f"{IMAGE}What is in the picture?"), {"image": [(0, (224, 224))]}),
    (
        _chat(f"Look at this picture: {IMAGE}and describe the colours, left to right."),
        {"image": [(1, (280, 196))]},
    ),
    (
        _chat(f"{IMAGE}{IMAGE}Compare the two pictures."),
        {"image": [(2, (224, 224)), (3, (196, 252))]},
    ),
    (_chat(f"{VIDEO}What happens in the video?"), {"video": (4, 4, (224, 224))}),
    (_chat("Tell me a short story about a red triangle."), {}),
]
VISION = [i for i, (_, media) in enumerate(REQUESTS) if media]


def _media(spec: dict) -> tuple[list, list]:
    images = [make_test_image(seed, size=size) for seed, size in spec.get("image", [])]
    videos = []
    if "video" in spec:
        seed, frames, size = spec["video"]
        videos = [make_test_video(seed, num_frames=frames, size=size)]
    return images, videos


def _prompt(i: int) -> dict:
    text, spec = REQUESTS[i]
    images, videos = _media(spec)
    data = {}
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    if videos:
        data["video"] = (videos[0], video_metadata(len(videos[0])))
    return {"prompt": text, **({"multi_modal_data": data} if data else {})}


def _params(k: int | None = None):
    from vllm import SamplingParams

    extra = None if k is None else {"vtw_k": k}
    return SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, logprobs=-1, extra_args=extra, ignore_eos=True
    )


def _generate(llm, indices: list[int], ks: list[int | None]):
    return llm.generate([_prompt(i) for i in indices], [_params(k) for k in ks], use_tqdm=False)


def _reference(i: int, k: int):
    text, spec = REQUESTS[i]
    images, videos = _media(spec)
    return vtw_generate(str(get_fixture(KIND)), text, images, k, MAX_TOKENS, videos=videos)


LIMIT = {"image": 2, "video": 1}


@pytest.fixture(scope="module")
def stock() -> list:
    with vllm_engine(str(get_fixture(KIND)), limit_mm_per_prompt=LIMIT) as llm:
        return [_generate(llm, [i], [None])[0] for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def vtw(stock):  # after the stock engine is gone
    overrides = {"architectures": [ARCH], "vtw_layer_group_size": 1}
    with vllm_engine(
        str(get_fixture(KIND)),
        limit_mm_per_prompt=LIMIT,
        hf_overrides=overrides,
        enforce_eager=False,  # vLLM's default: compiled layer spans, M-RoPE positions
    ) as llm:
        yield llm


def test_k_equals_n_is_stock(vtw, stock):
    indices = list(range(len(REQUESTS)))
    for ks in ([None] * len(indices), [NUM_LAYERS] * len(indices)):
        for out, ref in zip(_generate(vtw, indices, ks), stock, strict=True):
            assert out.prompt_token_ids == ref.prompt_token_ids
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids, ks
            assert_close(first_logprobs(out), first_logprobs(ref), atol=1e-4, what="logprobs")


@pytest.mark.parametrize("k", [1, NUM_LAYERS // 2, NUM_LAYERS - 2])
def test_matches_reference(vtw, k):
    outputs = _generate(vtw, VISION, [k] * len(VISION))
    for i, out in zip(VISION, outputs, strict=True):
        ref = _reference(i, k)
        assert out.prompt_token_ids == ref.prompt_token_ids, f"request {i}"
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"request {i}, K={k}"
        vllm_lp = first_logprobs(out)
        assert_close(vllm_lp, ref.first_logprobs[: len(vllm_lp)], atol=1e-3, what=f"req {i}")


def test_vtw_changes_vision_requests_only(vtw, stock):
    indices = list(range(len(REQUESTS)))
    for i, out in zip(indices, _generate(vtw, indices, [1] * len(indices)), strict=True):
        diff = (first_logprobs(out) - first_logprobs(stock[i])).abs().max().item()
        if i in VISION:
            assert diff > 1e-2, f"request {i}: withdrawal at K=1 changed nothing"
        else:
            assert diff <= 1e-4, f"request {i}: a text-only request changed"
            assert out.outputs[0].token_ids == stock[i].outputs[0].token_ids


def test_mixed_k_batch_equals_solo_runs(vtw):
    indices, ks = [0, 1, 2, 3, 4, 0, 3], [2, 5, 3, NUM_LAYERS, 1, 7, 6]
    batch = _generate(vtw, indices, ks)
    for i, k, out in zip(indices, ks, batch, strict=True):
        (solo,) = _generate(vtw, [i], [k])
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids, f"request {i}, K={k}"
        assert_close(first_logprobs(out), first_logprobs(solo), atol=1e-4, what="logprobs")
