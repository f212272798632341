"""Soak: 500 mixed requests against ``vllm serve`` with VTW and a small KV budget.

Images / two images / no image, mixed K (incl. the default), streaming and not, random
client disconnects. Every finished request must equal its solo run (each template is
first run alone), the KV pool must be empty afterwards, the Prometheus KV gauge must
show VTW's compacted block count, and the vtw_server log must hold no error.
Bounded: a few minutes on 2 cores. Shares the vtw_server of ``test_server.py``.
"""

import asyncio
import json
import math
import random

import httpx
import pytest
from conftest import data_url, metric, needs_ranks

pytestmark = [pytest.mark.engine, needs_ranks(2)]  # the shared server: 2 DP ranks
NUM_REQUESTS, CONCURRENCY, MAX_TOKENS, ABORT_RATE = 500, 24, 6, 0.1
QUESTIONS = ["What is in the picture?", "Describe the shapes.", "Which colour dominates?"]


def _templates() -> list[dict]:
    """Distinct requests (images, question, K); the soak draws from these."""
    templates = []
    for i, k in enumerate([2, None, 6, 8, 4, 2, None, 8]):
        images = [] if i % 4 == 3 else [i] if i % 4 != 2 else [i, i + 1]
        templates.append({"images": images, "question": QUESTIONS[i % 3], "vtw_k": k})
    return templates


def _body(vtw_server, template: dict, stream: bool) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(s)}} for s in template["images"]]
    content.append({"type": "text", "text": template["question"]})
    body = {
        "model": vtw_server["model"],
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }
    if template["vtw_k"] is not None:
        body["vllm_xargs"] = {"vtw_k": template["vtw_k"]}
    return body


async def _run(client: httpx.AsyncClient, vtw_server, template: dict, stream: bool, abort: bool):
    """The answer's text, or None when this request was abandoned by the client."""
    url = f"{vtw_server['base']}/v1/chat/completions"
    if not stream:
        if abort:  # the client gives up mid-request: the vtw_server must abort it
            try:
                await asyncio.wait_for(
                    client.post(url, json=_body(vtw_server, template, False)), 0.05
                )
            except asyncio.TimeoutError:
                return None
        resp = await client.post(url, json=_body(vtw_server, template, False))
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]
    text = ""
    async with client.stream("POST", url, json=_body(vtw_server, template, True)) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if abort and text:
                return None  # disconnect after the first tokens
    return text


async def _soak(vtw_server, templates, expected) -> dict:
    rng = random.Random(0)
    sem = asyncio.Semaphore(CONCURRENCY)
    counts = {"finished": 0, "aborted": 0}

    async def one(client):
        t = rng.randrange(len(templates))
        stream, abort = rng.random() < 0.5, rng.random() < ABORT_RATE
        async with sem:
            text = await _run(client, vtw_server, templates[t], stream, abort)
        if text is None:
            counts["aborted"] += 1
        else:
            assert text == expected[t], f"template {t} (stream={stream}) differs from solo run"
            counts["finished"] += 1

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client) for _ in range(NUM_REQUESTS)))
    return counts


async def _solo(vtw_server, templates) -> list[str]:
    async with httpx.AsyncClient(timeout=300) as client:
        return [await _run(client, vtw_server, t, stream=False, abort=False) for t in templates]


def test_metrics_show_compacted_kv(vtw_server):
    """While one long request runs, the KV gauge equals VTW's block count, not stock's.

    The gauge is polled throughout the request; every reading taken while it runs must
    lie between VTW's block count at the prompt and at the last token. max_tokens is
    chosen so that even the last-token count is well below stock's count at the prompt.
    """
    max_tokens = 100
    template = {"images": [9], "question": QUESTIONS[0], "vtw_k": 2}
    body = {**_body(vtw_server, template, True), "max_tokens": max_tokens, "ignore_eos": True}
    info = httpx.get(f"{vtw_server['base']}/metrics", timeout=10).text
    # One engine's pool: the info line sums the data-parallel engines' pools (vLLM).
    num_blocks = int(info.split('num_gpu_blocks="')[1].split('"')[0])
    num_blocks //= vtw_server["data_parallel_size"]
    block_size = int(info.split('block_size="')[1].split('"')[0])
    url, name = f"{vtw_server['base']}/v1/chat/completions", "vllm:kv_cache_usage_perc"

    async def watch() -> list[float]:
        done, readings = asyncio.Event(), []

        async def poll(client):
            while not done.is_set():
                text = (await client.get(f"{vtw_server['base']}/metrics")).text
                readings.extend(
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.split("{")[0].split(" ")[0] == name
                )
                await asyncio.sleep(0.02)

        async with httpx.AsyncClient(timeout=300) as client:
            poller = asyncio.create_task(poll(client))
            async with client.stream("POST", url, json=body) as resp:
                async for _ in resp.aiter_lines():
                    pass
            done.set()
            await poller
        return [r for r in readings if r > 0]

    readings = asyncio.run(watch())
    assert readings, "the KV gauge never showed the running request"
    prompt_len, vision = 576 + 14, 576  # "USER: <image>\\n..." with the 336px image

    def vtw_usage(n: int) -> float:  # group 0 (layers < 2) holds all, 3 deep groups text only
        blocks = math.ceil(n / block_size) + 3 * math.ceil((n - vision) / block_size)
        return blocks / (num_blocks - 1)

    stock_at_prompt = 4 * math.ceil(prompt_len / block_size) / (num_blocks - 1)
    lo, hi = vtw_usage(prompt_len), vtw_usage(prompt_len + max_tokens)
    assert hi < 0.6 * stock_at_prompt  # the test's own premise
    assert all(lo * 0.99 <= r <= hi * 1.01 for r in readings), (readings, lo, hi)


def test_soak_500_mixed_requests(vtw_server):
    templates = _templates()
    expected = asyncio.run(_solo(vtw_server, templates))
    counts = asyncio.run(_soak(vtw_server, templates, expected))
    print(f"soak: {counts}, preemptions: {metric(vtw_server, 'vllm:num_preemptions_total')}")
    assert counts["finished"] + counts["aborted"] == NUM_REQUESTS
    assert counts["aborted"] > 0 and counts["finished"] > 0.8 * NUM_REQUESTS

    async def drained():
        for _ in range(60):
            if (
                metric(vtw_server, "vllm:num_requests_running") == 0
                and metric(vtw_server, "vllm:num_requests_waiting") == 0
            ):
                return True
            await asyncio.sleep(1)
        return False

    assert asyncio.run(drained())
    httpx.post(  # one more step so the gauges are refreshed after the last free
        f"{vtw_server['base']}/v1/completions",
        json={"model": vtw_server["model"], "prompt": "USER: hi ASSISTANT:", "max_tokens": 1},
        timeout=60,
    )
    assert metric(vtw_server, "vllm:kv_cache_usage_perc") == 0
    errors = [
        line
        for line in vtw_server["log"].read_text().splitlines()
        if " ERROR " in line or "Traceback" in line
    ]
    assert not errors, "\n".join(errors[:20])
