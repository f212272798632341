"""The tiny fixtures are faithful: stock vLLM serves them, and its first generated
token's log-probabilities equal a plain transformers forward on the same checkpoint."""

import pytest
import torch
from conftest import assert_close, vllm_engine
from transformers import AutoModelForImageTextToText, AutoProcessor

from vtw_vllm.testing import get_fixture, make_test_image, make_test_video

PROMPTS = [  # (question, image size): anyres tiling differs per size for LLaVA-NeXT
    ("What is in the picture?", (336, 336)),
    ("Describe the colours and the shapes you can see, from left to right.", (640, 480)),
    ("Count them.", (300, 800)),
]


def _requests(seeds: range) -> list[tuple[str, object]]:
    return [
        (f"USER: <image>\n{question} ASSISTANT:", make_test_image(seed, size=size))
        for seed, (question, size) in zip(seeds, PROMPTS, strict=False)
    ]


def _transformers_logprobs(model_dir: str, prompt: str, image) -> tuple[list[int], torch.Tensor]:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return inputs["input_ids"][0].tolist(), torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.engine
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_vllm_matches_transformers(kind: str):
    from vllm import SamplingParams

    model_dir = str(get_fixture(kind))
    requests = _requests(range(len(PROMPTS)))
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=-1)
    with vllm_engine(model_dir) as llm:
        outputs = llm.generate(
            [{"prompt": p, "multi_modal_data": {"image": img}} for p, img in requests], params
        )

    image_token_id = 4
    for (prompt, image), out in zip(requests, outputs, strict=True):
        hf_ids, hf_logprobs = _transformers_logprobs(model_dir, prompt, image)
        assert out.prompt_token_ids == hf_ids, "vLLM and transformers tokenized differently"
        n_image = hf_ids.count(image_token_id)
        assert n_image == 576 if kind == "llava" else n_image > 1000
        first = out.outputs[0].logprobs[0]
        vllm_logprobs = torch.full_like(hf_logprobs, float("-inf"))
        for token_id, lp in first.items():
            vllm_logprobs[token_id] = lp.logprob
        assert len(first) == hf_logprobs.numel(), "expected the full vocabulary's logprobs"
        assert_close(vllm_logprobs, hf_logprobs, atol=2e-3, what=f"{kind} first-token logprobs")
        assert out.outputs[0].token_ids[0] == int(hf_logprobs.argmax())


# (prompt, images, videos) per video fixture: videos are [frames, height, width, 3] uint8.
VIDEO_FIXTURE_REQUESTS = {
    "llava_next_video": lambda: [
        ("USER: <video>\nWhat happens in the video? ASSISTANT:", [], [make_test_video(0)]),
        (
            "USER: <video>\nDescribe the motion. ASSISTANT:",
            [],
            [make_test_video(1, num_frames=6, size=(640, 480))],
        ),
    ],
    "llava_onevision": lambda: [
        ("USER: <video>\nWhat happens in the video? ASSISTANT:", [], [make_test_video(0)]),
        ("USER: <image>\nWhat is in the picture? ASSISTANT:", [make_test_image(1, (640, 480))], []),
        (
            "USER: <image>\n<video>\nCompare them. ASSISTANT:",
            [make_test_image(2, (384, 384))],
            [make_test_video(3, num_frames=3, size=(384, 384))],
        ),
    ],
}
# Vision tokens per pooled frame (+ OneVision's newline token after each video).
FRAME_TOKENS = {"llava_next_video": (144, 0), "llava_onevision": (196, 1)}


@pytest.mark.engine
@pytest.mark.parametrize("kind", list(VIDEO_FIXTURE_REQUESTS))
def test_vllm_matches_transformers_video(kind: str):
    from vllm import SamplingParams

    model_dir = str(get_fixture(kind))
    requests = VIDEO_FIXTURE_REQUESTS[kind]()
    limit = {"video": 1} if kind == "llava_next_video" else {"image": 1, "video": 1}
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=-1)
    prompts = []
    for text, images, videos in requests:
        data = {"image": images[0]} if images else {}
        if videos:
            data["video"] = videos[0]
        prompts.append({"prompt": text, "multi_modal_data": data})
    with vllm_engine(model_dir, limit_mm_per_prompt=limit) as llm:
        # One request at a time: stock vLLM 0.32's OneVision dies when two videos of
        # different frame counts share an encoder step (tests/test_video.py).
        outputs = [llm.generate(prompt, params)[0] for prompt in prompts]

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    image_id, video_id = model.config.image_token_id, model.config.video_token_id
    per_frame, per_video = FRAME_TOKENS[kind]
    for (text, images, videos), out in zip(requests, outputs, strict=True):
        media = {"images": images or None, **({"videos": videos} if videos else {})}
        inputs = processor(text=text, return_tensors="pt", **media)
        with torch.no_grad():
            hf_logprobs = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
        hf_ids = inputs["input_ids"][0].tolist()
        assert out.prompt_token_ids == hf_ids, "vLLM and transformers tokenized differently"
        expected_video = sum(per_frame * len(v) + per_video for v in videos)
        assert hf_ids.count(video_id) == expected_video
        assert (hf_ids.count(image_id) > 729) == bool(images)  # anyres: base tile + more
        first = out.outputs[0].logprobs[0]
        assert len(first) == hf_logprobs.numel(), "expected the full vocabulary's logprobs"
        vllm_logprobs = torch.full_like(hf_logprobs, float("-inf"))
        for token_id, lp in first.items():
            vllm_logprobs[token_id] = lp.logprob
        assert_close(vllm_logprobs, hf_logprobs, atol=2e-3, what=f"{kind} first-token logprobs")
        assert out.outputs[0].token_ids[0] == int(hf_logprobs.argmax())
