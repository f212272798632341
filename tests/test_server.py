"""``vllm serve`` with VTW on loopback: per-request K through ``vllm_xargs``, HTTP 400 for
a bad K, and the server keeps serving. Images go through chat completions as data URLs
(vLLM's completions endpoint takes no images)."""

import base64
import io
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.reference import vtw_generate

pytestmark = pytest.mark.engine
ALLOWED = [2, 4, 6, 8]  # vtw_layer_group_size=2 on 8 layers
QUESTION = "What is in the picture?"
MAX_TOKENS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = str(get_fixture("llava"))
    port = _free_port()
    overrides = {
        "architectures": ["LlavaVTWForConditionalGeneration"],
        "vtw_k": 4,
        "vtw_layer_group_size": 2,
    }
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "4096", "--enforce-eager", "--max-logprobs", "-1",
        "--kv-cache-memory-bytes", str(64 * 2**20), "--max-num-seqs", "8",
        "--limit-mm-per-prompt", json.dumps({"image": 2}),
        "--hf-overrides", json.dumps(overrides),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield {"base": base, "model": model_dir, "log": log_path}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _data_url(seed: int) -> str:
    buf = io.BytesIO()
    make_test_image(seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat_body(server, seed: int, vtw_k=None) -> dict:
    body = {
        "model": server["model"],
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(seed)}},
            {"type": "text", "text": QUESTION},
        ]}],
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "return_token_ids": True,
    }  # fmt: skip
    if vtw_k is not None:
        body["vllm_xargs"] = {"vtw_k": vtw_k}
    return body


def _completion_body(server, vtw_k) -> dict:
    return {
        "model": server["model"],
        "prompt": "USER: Tell me about triangles. ASSISTANT:",
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "vllm_xargs": {"vtw_k": vtw_k},
    }


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server['base']}/v1/{path}", json=body, timeout=120)


def test_chat_per_request_k_matches_reference(server):
    tokens = {}
    for k in (2, None, 6, 8):  # None: the deployment default, 4
        resp = _post(server, "chat/completions", _chat_body(server, seed=3, vtw_k=k))
        assert resp.status_code == 200, resp.text
        data = resp.json()
        ref = vtw_generate(
            server["model"],
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


def test_openai_client_and_completions(server):
    import openai

    client = openai.OpenAI(base_url=f"{server['base']}/v1", api_key="none")
    chat = client.chat.completions.create(
        **{k: v for k, v in _chat_body(server, seed=5).items() if k != "return_token_ids"},
        extra_body={"vllm_xargs": {"vtw_k": 2}},
    )
    assert chat.choices[0].message.content
    for k in ALLOWED:  # text only: K accepted, nothing to withdraw
        resp = _post(server, "completions", _completion_body(server, k))
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("bad", [-1, 0, 9, 3, "4", 4.5, True, [4]])
def test_bad_vtw_k_is_http_400_and_server_keeps_serving(server, bad):
    for path, body in (
        ("chat/completions", _chat_body(server, seed=1, vtw_k=bad)),
        ("completions", _completion_body(server, bad)),
    ):
        resp = _post(server, path, body)
        assert resp.status_code == 400, (path, resp.text)
        assert str(ALLOWED) in resp.json()["error"]["message"]
    good = _post(server, "chat/completions", _chat_body(server, seed=1, vtw_k=2))
    assert good.status_code == 200


def test_no_request_left_running(server):
    metrics = httpx.get(f"{server['base']}/metrics", timeout=10).text
    running = [
        line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")
    ]
    assert running and all(line.rstrip().endswith(" 0.0") for line in running), running
