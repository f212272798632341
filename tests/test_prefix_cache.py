"""Prefix caching with compacted deep layers: multi-turn chats that resend their images.

In-process VTW engine at vLLM's defaults for caching (on), default K = 4, layer groups
of 2 (KV groups start at layers 0, 2, 4, 6; groups 4 and 6 are compacted at K = 4),
block size 128 (vLLM's CPU default: 576 vision tokens are not a whole number of blocks,
so hits past an image end mid-block in the compacted groups and take vLLM's
copy-on-write). Each turn resends the whole conversation; a turn after the first must

- hit the cache for every full block the previous turn computed that it shares
  (the hit is one length for all KV groups, so every group served it),
- give the same tokens and log-probs as the same request with the cache reset, and the
  tokens of the transformers reference,
and every block must be back in the pool at the end.
"""

import pytest
from conftest import assert_close, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.reference import vtw_generate

pytestmark = pytest.mark.engine
K, BLOCK, MAX_TOKENS = 4, 128, 4
LONG_QUESTION = (
    "Please look very carefully at every part of this picture, from the top left corner "
    "to the bottom right corner, and then tell me which shapes you can see, what colour "
    "each of them has, how many there are of each kind, and where they are placed "
    "relative to each other in the picture."
)
ANSWER = " I see a few coloured shapes on a plain background.</s>"
# (question, image seeds) per user turn; earlier turns' answers are the fixed ANSWER.
CHATS = {
    "one image": [(f"<image>\n{LONG_QUESTION}", [30]), ("What colour is it?", []), ("Why?", [])],
    "two images": [(f"<image>\n<image>\n{LONG_QUESTION}", [31, 32]), ("Which is bigger?", [])],
    "image mid-chat": [
        (f"Hello! {LONG_QUESTION}", []),
        (f"Here it is: <image>\n{LONG_QUESTION}", [33]),
        ("And now?", []),
    ],
}


def _turns(chat: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """The prompt text and image seeds of every turn (each resends what came before)."""
    text, seeds, out = "", [], []
    for question, new_seeds in chat:
        text += f"USER: {question} ASSISTANT:"
        seeds = seeds + new_seeds
        out.append((text, seeds))
        text += ANSWER
    return out


def _request(text: str, seeds: list[int]) -> dict:
    request = {"prompt": text}
    if seeds:
        images = [make_test_image(s) for s in seeds]
        request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    return request


def _params(k: int | None = None):
    from vllm import SamplingParams

    extra = None if k is None else {"vtw_k": k}
    return SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True, extra_args=extra
    )


@pytest.fixture(scope="module")
def engine():
    with vllm_engine(
        str(get_fixture("llava")),
        hf_overrides={
            "architectures": ["LlavaVTWForConditionalGeneration"],
            "vtw_k": K,
            "vtw_layer_group_size": 2,
        },
        block_size=BLOCK,
        limit_mm_per_prompt={"image": 2},
    ) as llm:
        yield llm


def _pool(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool


def _first_logprobs(out) -> dict[int, float]:
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def _assert_same(warm, cold, what: str) -> None:
    import torch

    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids), what
    w, c = _first_logprobs(warm), _first_logprobs(cold)
    assert w.keys() == c.keys(), what
    keys = sorted(w)
    assert_close(
        torch.tensor([w[t] for t in keys]), torch.tensor([c[t] for t in keys]), 1e-4, what=what
    )


def test_caching_is_on(engine):
    assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


@pytest.mark.parametrize("name", list(CHATS))
def test_multi_turn_chat_hits_and_matches(engine, name):
    model_dir = str(get_fixture("llava"))
    engine.reset_prefix_cache()
    previous, previous_prompt = None, 0  # the previous turn's prompt + output, prompt length
    for turn, (text, seeds) in enumerate(_turns(CHATS[name])):
        (warm,) = engine.generate(_request(text, seeds), _params())
        ids = list(warm.prompt_token_ids)
        if previous is not None:
            common = 0
            while common < min(len(ids), len(previous)) and ids[common] == previous[common]:
                common += 1
            assert common >= previous_prompt - 1, f"{name} turn {turn}: not a prefix"
            computed = len(previous) - 1  # the previous turn's last token has no KV
            expected = min(common, computed, len(ids) - 1) // BLOCK * BLOCK
            assert warm.num_cached_tokens == expected, (name, turn)
        engine.reset_prefix_cache()
        (cold,) = engine.generate(_request(text, seeds), _params())
        assert cold.num_cached_tokens == 0
        _assert_same(warm, cold, f"{name} turn {turn}: cached vs not")
        ref = vtw_generate(model_dir, text, [make_test_image(s) for s in seeds], K, MAX_TOKENS)
        assert list(warm.outputs[0].token_ids) == ref.token_ids, f"{name} turn {turn}"
        # Put this turn back in the cache for the next one (reset removed it).
        engine.reset_prefix_cache()
        (again,) = engine.generate(_request(text, seeds), _params())
        previous = ids + list(again.outputs[0].token_ids)
        previous_prompt = len(ids)


def test_hits_past_the_image_use_copy_on_write(engine):
    """A resend of a turn whose prefix ends past its image: the compacted groups' hit
    ends mid-block (kept tokens not a multiple of 128) and still matches."""
    text, seeds = _turns(CHATS["one image"])[0]
    engine.reset_prefix_cache()
    (first,) = engine.generate(_request(text, seeds), _params())
    (second,) = engine.generate(_request(text, seeds), _params())
    image_end = 5 + 576  # "USER: " + the image tokens, measured below
    assert len(first.prompt_token_ids) > image_end + BLOCK // 2
    assert second.num_cached_tokens >= 640 > image_end  # 640 - 576 = 64 kept: mid-block
    _assert_same(second, first, "resend")


@pytest.mark.parametrize("k", [2, 6, 8])
def test_other_k_on_the_same_image_is_correct(engine, k):
    """K = 4 turns filled the cache; a request with another K must not reuse the
    compacted blocks (their KV depends on K) and must equal its reference."""
    model_dir = str(get_fixture("llava"))
    text, seeds = _turns(CHATS["one image"])[1]
    engine.reset_prefix_cache()
    engine.generate(_request(text, seeds), _params())  # K = 4 writes the cache
    (out,) = engine.generate(_request(text, seeds), _params(k))
    ref = vtw_generate(model_dir, text, [make_test_image(s) for s in seeds], k, MAX_TOKENS)
    assert list(out.outputs[0].token_ids) == ref.token_ids
    assert out.num_cached_tokens == 0  # the image starts in block 0: nothing K-free to share
    (same_k,) = engine.generate(_request(text, seeds), _params(k))
    assert same_k.num_cached_tokens > 0  # its own K's blocks do hit
    _assert_same(same_k, out, f"K={k} resend")


def test_every_block_returns(engine):
    pool = _pool(engine)
    engine.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    for name in CHATS:
        requests = 2 * [_request(t, s) for t, s in _turns(CHATS[name])]
        engine.generate(requests, [_params((2, 4, 8, None)[i % 4]) for i in range(len(requests))])
    assert not engine.llm_engine.engine_core.engine_core.scheduler.requests
    assert pool.get_num_free_blocks() == free_at_start
    assert engine.reset_prefix_cache()
