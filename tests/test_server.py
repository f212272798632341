"""``vllm serve`` with VTW on loopback (the session's shared server, see conftest.py: data
parallel, two engine cores behind two API servers): per-request K through ``vllm_xargs``,
HTTP 400 for a bad K from every API server, both engine cores serving, and the vtw_server
keeps serving. Images go through chat completions as data URLs (vLLM's completions
endpoint takes no images). Each request opens its own connection, so the kernel spreads
them over the API servers sharing the port."""

import httpx
import pytest
from conftest import data_url, metric_per_engine, needs_ranks

from vtw_vllm.testing import make_test_image
from vtw_vllm.testing.reference import vtw_generate

pytestmark = [pytest.mark.engine, needs_ranks(2)]  # the shared server: 2 DP ranks
ALLOWED = [2, 4, 6, 8]  # the shared vtw_server: prepared with allowed K [2, 4, 6], N = 8
QUESTION = "What is in the picture?"
MAX_TOKENS = 5


def _chat_body(vtw_server, seed: int, vtw_k=None) -> dict:
    body = {
        "model": vtw_server["model"],
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(seed)}},
            {"type": "text", "text": QUESTION},
        ]}],
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "return_token_ids": True,
    }  # fmt: skip
    if vtw_k is not None:
        body["vllm_xargs"] = {"vtw_k": vtw_k}
    return body


def _completion_body(vtw_server, vtw_k) -> dict:
    return {
        "model": vtw_server["model"],
        "prompt": "USER: Tell me about triangles. ASSISTANT:",
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "vllm_xargs": {"vtw_k": vtw_k},
    }


def _post(vtw_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{vtw_server['base']}/v1/{path}", json=body, timeout=120)


def test_chat_per_request_k_matches_reference(vtw_server):
    tokens = {}
    for k in (2, None, 6, 8):  # None: the deployment default, 4
        resp = _post(vtw_server, "chat/completions", _chat_body(vtw_server, seed=3, vtw_k=k))
        assert resp.status_code == 200, resp.text
        data = resp.json()
        ref = vtw_generate(
            vtw_server["source"],
            f"USER: <image>\n{QUESTION} ASSISTANT:",
            [make_test_image(3)],
            4 if k is None else k,
            MAX_TOKENS,
            add_special_tokens=False,
        )
        assert data["prompt_token_ids"] == ref.prompt_token_ids
        tokens[k] = data["choices"][0]["token_ids"]
        assert tokens[k] == ref.token_ids, f"vtw_k={k}"
    assert tokens[2] != tokens[8], "withdrawing at layer 2 should change this tiny model's answer"


def test_openai_client_and_completions(vtw_server):
    import openai

    client = openai.OpenAI(base_url=f"{vtw_server['base']}/v1", api_key="none")
    chat = client.chat.completions.create(
        **{k: v for k, v in _chat_body(vtw_server, seed=5).items() if k != "return_token_ids"},
        extra_body={"vllm_xargs": {"vtw_k": 2}},
    )
    assert chat.choices[0].message.content
    for k in ALLOWED:  # text only: K accepted, nothing to withdraw
        resp = _post(vtw_server, "completions", _completion_body(vtw_server, k))
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("bad", [-1, 0, 9, 3, "4", 4.5, True, [4]])
def test_bad_vtw_k_is_http_400_and_server_keeps_serving(vtw_server, bad):
    for path, body in (
        ("chat/completions", _chat_body(vtw_server, seed=1, vtw_k=bad)),
        ("completions", _completion_body(vtw_server, bad)),
    ):
        resp = _post(vtw_server, path, body)
        assert resp.status_code == 400, (path, resp.text)
        assert str(ALLOWED) in resp.json()["error"]["message"]
    good = _post(vtw_server, "chat/completions", _chat_body(vtw_server, seed=1, vtw_k=2))
    assert good.status_code == 200


def test_rejected_image_request_does_not_poison_the_mm_cache(vtw_server):
    """The multimodal processor cache stays on with VTW. A request rejected for its
    vtw_k was already rendered (its image entered the front end's cache) but never
    reached the engine; the next request with that image must still be served."""
    fresh = 77  # an image no other test sends
    bad = _post(vtw_server, "chat/completions", _chat_body(vtw_server, seed=fresh, vtw_k=3))
    assert bad.status_code == 400
    for _ in range(2):  # the first good one re-sends the image; the second hits the cache
        good = _post(vtw_server, "chat/completions", _chat_body(vtw_server, seed=fresh, vtw_k=2))
        assert good.status_code == 200, good.text


def test_both_data_parallel_engines_serve_per_request_k(vtw_server):
    """Eight chats at once, each its own image and K: every one equals the reference,
    and each engine core (its own scheduler and KV pool) finished some of them."""
    from concurrent.futures import ThreadPoolExecutor

    seeds, ks = list(range(30, 38)), [2, 4, 6, 8] * 2
    before = metric_per_engine(vtw_server, "vllm:request_success_total")
    with ThreadPoolExecutor(len(seeds)) as pool:
        bodies = [_chat_body(vtw_server, seed=s, vtw_k=k) for s, k in zip(seeds, ks, strict=True)]
        responses = list(
            pool.map(_post, [vtw_server] * len(seeds), ["chat/completions"] * 8, bodies)
        )
    for seed, k, resp in zip(seeds, ks, responses, strict=True):
        assert resp.status_code == 200, resp.text
        ref = vtw_generate(
            vtw_server["source"],
            f"USER: <image>\n{QUESTION} ASSISTANT:",
            [make_test_image(seed)],
            k,
            MAX_TOKENS,
            add_special_tokens=False,
        )
        assert resp.json()["choices"][0]["token_ids"] == ref.token_ids, f"image {seed}, K={k}"
    after = metric_per_engine(vtw_server, "vllm:request_success_total")
    assert sorted(after) == ["0", "1"], after
    assert all(after[e] > before.get(e, 0.0) for e in after), (before, after)


def test_bad_k_is_400_from_every_api_server(vtw_server):
    """Each API server resolved the VTW architecture, whose config hook arms the vtw_k
    check in that process; twenty bad requests, each on a new connection, so the kernel
    hands them to both (all twenty to one server: a 2 x 2^-20 chance)."""
    log = vtw_server["log"].read_text()
    for i in range(vtw_server["data_parallel_size"]):
        resolved = [ln for ln in log.splitlines() if ln.startswith(f"(ApiServer_{i} ")]
        assert any(
            "Resolved architecture: LlavaVTWForConditionalGeneration" in ln for ln in resolved
        )
    for _ in range(20):
        resp = _post(vtw_server, "chat/completions", _chat_body(vtw_server, seed=1, vtw_k=3))
        assert resp.status_code == 400, resp.text


def test_no_request_left_running(vtw_server):
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        values = metric_per_engine(vtw_server, name)
        assert sorted(values) == ["0", "1"] and not any(values.values()), (name, values)
