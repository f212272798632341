"""The tiny fixtures are faithful: stock vLLM serves them, and its first generated
token's log-probabilities equal a plain transformers forward on the same checkpoint."""

import pytest
import torch
from conftest import assert_close, vllm_engine
from transformers import AutoModelForImageTextToText, AutoProcessor

from vtw_vllm.testing import get_fixture, make_test_image

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
