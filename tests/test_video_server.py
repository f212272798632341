"""``vllm serve`` with VTW video models on loopback, ``vtw_allowed_k`` [2, 4] (K = 2, 4 and
8 = N), one server per model for the module, all eager (the compiled layer spans are the
same code, checked offline in ``test_vtw_engine.py``, ``test_qwen_vl.py`` and
``test_parallel.py``; fewer compiles keep CI within its budget): the tiny
LLaVA-OneVision for a chat with an image and a video together (LLaVA-NeXT-Video's video
path is the same VTW code, tested offline in ``test_video.py``), the tiny Qwen2.5-VL and
Qwen3-VL for an image and a video in Qwen's chat format. Chat completions carry
an MP4 as a ``video_url`` data URL (decoded by vLLM's default OpenCV loader) and a
per-request K in ``vllm_xargs``; the tokens equal the transformers reference on the
frames the MP4 decodes to.
"""

import base64
import json

import httpx
import pytest
from conftest import data_url, metric, served

from vtw_vllm.testing import (
    decode_video,
    get_fixture,
    make_test_image,
    make_test_video,
    mp4_bytes,
)
from vtw_vllm.testing.reference import vtw_generate
from vtw_vllm.testing.video_files import MP4_FPS

pytestmark = pytest.mark.engine
ALLOWED = [2, 4, 8]
DEFAULT_K = 4
QUESTION = "What happens in the video?"
MAX_TOKENS = 5


def _serve(kind: str, arch: str, limit: dict, tmp_path_factory, eager: bool = False):
    model_dir = str(get_fixture(kind))
    overrides = {"architectures": [arch], "vtw_k": DEFAULT_K, "vtw_allowed_k": [2, 4]}
    log_path = tmp_path_factory.mktemp(f"{kind}_server") / "server.log"
    args = [
        "--dtype", "float32", "--max-model-len", "4096",
        "--kv-cache-memory-bytes", str(32 * 2**20),
        "--limit-mm-per-prompt", json.dumps(limit),
        "--hf-overrides", json.dumps(overrides),
        *(["--enforce-eager"] if eager else []),
    ]  # fmt: skip
    with served(model_dir, args, log_path) as base:
        yield {"base": base, "model": model_dir, "log": log_path}


@pytest.fixture(scope="module")
def onevision_server(tmp_path_factory):
    yield from _serve(
        "llava_onevision",
        "LlavaOnevisionVTWForConditionalGeneration",
        {"image": 1, "video": 1},
        tmp_path_factory,
        eager=True,
    )


def _video(seed: int) -> bytes:
    """A 4-frame 336 px test video as MP4 (4 x 144 = 576 video tokens)."""
    return mp4_bytes(make_test_video(seed, num_frames=4), MP4_FPS)


def _chat(server: dict, video: bytes, vtw_k=None, image_seed=None) -> httpx.Response:
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}]
    if image_seed is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image_seed)}})
    body = {
        "model": server["model"],
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}],
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "return_token_ids": True,
    }  # fmt: skip
    if vtw_k is not None:
        body["vllm_xargs"] = {"vtw_k": vtw_k}
    return httpx.post(f"{server['base']}/v1/chat/completions", json=body, timeout=300)


def _assert_per_request_k_matches_reference(server: dict, seed: int, image_seed=None) -> None:
    """A chat with one video (and an image) at K = 2, the default 4 and N: the served
    prompt and tokens equal the transformers reference's, and K = 2 changes the answer."""
    video = _video(seed)
    frames = decode_video(video)
    assert frames.shape == (4, 336, 336, 3)
    images = [] if image_seed is None else [make_test_image(image_seed)]
    prompt = "USER: " + "<image>\n" * len(images) + f"<video>\n{QUESTION} ASSISTANT:"
    tokens = {}
    for k in (2, None, 8):  # None: the deployment's default K = 4
        resp = _chat(server, video, vtw_k=k, image_seed=image_seed)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        ref = vtw_generate(
            server["model"],
            prompt,
            images,
            DEFAULT_K if k is None else k,
            MAX_TOKENS,
            add_special_tokens=False,
            videos=[frames],
        )
        assert data["prompt_token_ids"] == ref.prompt_token_ids
        tokens[k] = data["choices"][0]["token_ids"]
        assert tokens[k] == ref.token_ids, f"vtw_k={k}"
    assert tokens[2] != tokens[8], "withdrawing at layer 2 should change this tiny model's answer"


def test_onevision_image_and_video_chat_matches_reference(onevision_server):
    """LLaVA-OneVision served: one image and one video in a chat; both are withdrawn at K
    (every image and video placeholder token), K per request; equal to the reference."""
    _assert_per_request_k_matches_reference(onevision_server, 13, image_seed=5)


@pytest.mark.parametrize("bad", [3, 0, 9, "4"])
def test_bad_vtw_k_is_http_400_and_server_keeps_serving(onevision_server, bad):
    video = _video(12)
    resp = _chat(onevision_server, video, vtw_k=bad)
    assert resp.status_code == 400, resp.text
    assert str(ALLOWED) in resp.json()["error"]["message"]
    good = _chat(onevision_server, video, vtw_k=2)
    assert good.status_code == 200, good.text


def test_no_request_left_running(onevision_server):
    assert metric(onevision_server, "vllm:num_requests_running") == 0


QWEN_ARCHS = {
    "qwen2_5_vl": "Qwen2_5_VLVTWForConditionalGeneration",
    "qwen3_vl": "Qwen3VLVTWForConditionalGeneration",
}


@pytest.fixture(scope="module", params=list(QWEN_ARCHS))
def qwen_server(request, tmp_path_factory):
    yield from _serve(
        request.param,
        QWEN_ARCHS[request.param],
        {"image": 1, "video": 1},
        tmp_path_factory,
        eager=True,  # Qwen3-VL's compiled spans are tested offline (test_qwen_vl.py)
    )


def test_qwen_image_and_video_chat_matches_reference(qwen_server):
    """Qwen2.5-VL and Qwen3-VL served: an image and an MP4 in one chat (Qwen's chat
    template; M-RoPE temporal positions, and Qwen3-VL's frame timestamps, from the file's
    frame rate), K per request; equal to the reference (the M-RoPE rows keeping their 3-D
    positions; Qwen3-VL's deepstack levels before K); a bad K is a 400 and the server goes
    on."""
    video = _video(14)
    frames = decode_video(video)
    n = len(frames)
    metadata = [{"fps": MP4_FPS, "frames_indices": list(range(n)), "total_num_frames": n}]
    prompt = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"<|vision_start|><|video_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tokens = {}
    for k in (2, None, 8):  # None: the deployment's default K = 4
        resp = _chat(qwen_server, video, vtw_k=k, image_seed=6)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        ref = vtw_generate(
            qwen_server["model"],
            prompt,
            [make_test_image(6)],
            DEFAULT_K if k is None else k,
            MAX_TOKENS,
            videos=[frames],
            video_metadata=metadata,
        )
        assert data["prompt_token_ids"] == ref.prompt_token_ids
        tokens[k] = data["choices"][0]["token_ids"]
        assert tokens[k] == ref.token_ids, f"vtw_k={k}"
    assert tokens[2] != tokens[8], "withdrawing at layer 2 should change this tiny model's answer"
    bad = _chat(qwen_server, video, vtw_k=3)
    assert bad.status_code == 400 and str(ALLOWED) in bad.json()["error"]["message"]
    assert metric(qwen_server, "vllm:num_requests_running") == 0
