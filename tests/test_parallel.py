"""VTW on vLLM's multi-device engines (CPU build: gloo between worker processes).

- Tensor x pipeline parallel: one engine at TP = 2 x PP = 2 (four worker processes, two
  layer stages of four layers), compiled at vLLM's defaults, ``vtw_allowed_k`` [1, 4, 7]:
  K = 1 withdraws on stage 0 (stage 1 receives every row and withdraws them again), K = 4
  at stage 1's first layer, K = 7 inside stage 1. Chunked prefill at 256 tokens puts a
  vision-only chunk through both stages. Equal to the transformers reference.
  (``tests/test_kv_accounting.py`` runs its engine at TP = 2 alone: block accounting at
  every step, preemption, aborts and resumed requests there.)
- Data parallel: the session's shared ``vllm serve`` runs ``--data-parallel-size 2``
  (``tests/test_server.py``, ``tests/test_soak.py``).
- Across nodes: ``vllm serve`` at TP = 2 over two nodes on loopback (vLLM's ``--nnodes`` /
  ``--node-rank`` launch, node 1 ``--headless``): per-request K equal to the reference.

The CPU build binds each rank's OpenMP threads to cores; on this 2-core machine that
is done by hand (``VLLM_CPU_OMP_THREADS_BIND``: one entry per rank). Every test has a
timeout (``pytest-timeout``), so a rank that hangs fails CI instead of stalling it.
"""

import json
import math
import subprocess
import sys

import httpx
import pytest
from conftest import (
    _free_port,
    assert_close,
    data_url,
    environment,
    first_logprobs,
    needs_ranks,
    served,
    vllm_engine,
)

from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.reference import vtw_generate
from vtw_vllm.vision_ranges import kept_tokens, vision_ranges

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
ARCH = "LlavaVTWForConditionalGeneration"
ALLOWED_K = [1, 4, 7]
MAX_TOKENS = 5
# (prompt, image seeds, image size): images at different offsets, two images, no image.
REQUESTS = [
    ("USER: <image>\nWhat is in the picture? ASSISTANT:", [60], (336, 336)),
    (
        "A chat between a curious user and an artificial intelligence assistant. "
        "USER: <image>\nDescribe the colours and the shapes, left to right. ASSISTANT:",
        [61],
        (640, 480),
    ),
    ("USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:", [62, 63], (336, 336)),
    ("USER: Tell me a short story about a red triangle. ASSISTANT:", [], None),
]


def _prompt(i: int) -> dict:
    text, seeds, size = REQUESTS[i]
    prompt = {"prompt": text}
    if seeds:
        images = [make_test_image(s, size=size) for s in seeds]
        prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    return prompt


def _params(k: int):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, logprobs=-1, extra_args={"vtw_k": k}
    )


def _reference(model_dir: str, i: int, k: int):
    text, seeds, size = REQUESTS[i]
    return vtw_generate(
        model_dir, text, [make_test_image(s, size=size) for s in seeds], k, MAX_TOKENS
    )


@pytest.fixture(scope="module")
def llava_dir() -> str:
    return str(get_fixture("llava"))


TP_PP = needs_ranks(4)


@pytest.fixture(scope="module")
def tp_pp_engine(llava_dir):
    with (
        environment(VLLM_CPU_OMP_THREADS_BIND="0|0|1|1"),
        vllm_engine(
            llava_dir,
            tensor_parallel_size=2,
            pipeline_parallel_size=2,
            enforce_eager=False,  # vLLM's default; the CPU build runs PP only compiled
            hf_overrides={"architectures": [ARCH], "vtw_allowed_k": ALLOWED_K},
            limit_mm_per_prompt={"image": 2},
            max_num_batched_tokens=256,  # chunked prefill: [256, 512) is vision only
        ) as llm,
    ):
        yield llm


@TP_PP
def test_stages_own_their_layers_and_kv_groups(tp_pp_engine):
    parallel = tp_pp_engine.llm_engine.vllm_config.parallel_config
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size) == (2, 2)
    groups = _scheduler(tp_pp_engine).kv_cache_config.kv_cache_groups
    # vLLM's hybrid manager splits layer groups into KV groups of one layer each here.
    assert sorted({g.kv_cache_spec.first_layer for g in groups}) == [0, 1, 4, 7]
    assert len(groups) == 8


@TP_PP
@pytest.mark.parametrize("ks", [[1, 4, 7, 1], [7, 8, 4, 1]], ids=["a", "b"])
def test_mixed_k_across_stages_equals_reference(tp_pp_engine, llava_dir, ks):
    """Every request with its own K in one batch: withdrawn on stage 0 (K = 1), at the
    stage boundary (4), inside stage 1 (7), never (8); tokens and first log-probs equal
    the single-process transformers reference."""
    indices = list(range(len(REQUESTS)))
    outputs = tp_pp_engine.generate([_prompt(i) for i in indices], [_params(k) for k in ks])
    for i, k, out in zip(indices, ks, outputs, strict=True):
        ref = _reference(llava_dir, i, k)
        assert out.prompt_token_ids == ref.prompt_token_ids
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"request {i}, K={k}"
        lp = first_logprobs(out)
        assert_close(lp, ref.first_logprobs[: len(lp)], atol=1e-3, what=f"request {i}, K={k}")


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@TP_PP
def test_blocks_follow_formula_and_return(tp_pp_engine):
    """Per KV group, blocks = the request's kept tokens (all below K, text only from K on)
    at every step, through a vision-only prefill chunk; all back after finish."""
    llm, sched = tp_pp_engine.llm_engine, _scheduler(tp_pp_engine)
    pool = sched.kv_cache_manager.block_pool
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    block_size = sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    free_at_start = pool.get_num_free_blocks()
    ks = {"kv0": 1, "kv1": 4, "kv2": 7}
    for req_id, k in ks.items():
        llm.add_request(req_id, _prompt(1), _params(k))  # 640 x 480: > 512 tokens
    checked, vision_only_chunk = 0, False
    while llm.has_unfinished_requests():
        llm.step()
        for req_id, request in sched.requests.items():
            ranges = vision_ranges(request.mm_features)
            n = request.num_computed_tokens
            vision_only_chunk |= n == 512  # [256, 512) held no text token
            k = ks[req_id.split("-")[0]]
            for manager in managers:
                withdrawn = manager.kv_cache_spec.first_layer >= k
                held = kept_tokens(ranges, n) if withdrawn else n
                assert len(manager.req_to_blocks[req_id]) == math.ceil(held / block_size)
                checked += 1
    assert checked > 20 and vision_only_chunk
    assert not sched.requests
    assert pool.get_num_free_blocks() == free_at_start


# -- two nodes on loopback ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_node_server(llava_dir, tmp_path_factory):
    """vLLM's multi-node launch (``mp`` backend): TP = 2 across two "nodes" on loopback,
    node 0 ``vllm serve ... --nnodes 2 --node-rank 0`` with the API server and rank 0,
    node 1 the same with ``--node-rank 1 --headless`` (rank 1 only), as on a cluster."""
    logs = tmp_path_factory.mktemp("two_nodes")
    common = [
        "--tensor-parallel-size", "2", "--nnodes", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "--hf-overrides", json.dumps({"architectures": [ARCH], "vtw_allowed_k": ALLOWED_K}),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        "--kv-cache-memory-bytes", str(12 * 2**20),
    ]  # fmt: skip
    node1_cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", llava_dir,
        *common, "--node-rank", "1", "--headless",
    ]  # fmt: skip
    with (
        environment(VLLM_CPU_OMP_THREADS_BIND="1"),  # node 1's one rank on core 1
        open(logs / "node1.log", "w") as log,
    ):
        node1 = subprocess.Popen(node1_cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        with (
            environment(VLLM_CPU_OMP_THREADS_BIND="0"),
            served(llava_dir, [*common, "--node-rank", "0"], logs / "node0.log") as base,
        ):
            try:
                yield {"base": base, "model": llava_dir, "node1": node1}
            finally:  # node 1 first: node 0's shutdown then need not wait for its worker
                node1.terminate()
                node1.wait(timeout=60)
    finally:
        if node1.poll() is None:
            node1.kill()


@needs_ranks(2)
def test_two_nodes_serve_per_request_k(two_node_server, llava_dir):
    assert two_node_server["node1"].poll() is None  # node 1 is serving, not exited
    question = "What is in the picture?"
    for k, seed in ((1, 80), (4, 81), (7, 82), (8, 80)):
        body = {
            "model": two_node_server["model"],
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(seed)}},
                {"type": "text", "text": question},
            ]}],
            "temperature": 0.0,
            "max_tokens": MAX_TOKENS,
            "return_token_ids": True,
            "vllm_xargs": {"vtw_k": k},
        }  # fmt: skip
        resp = httpx.post(f"{two_node_server['base']}/v1/chat/completions", json=body, timeout=300)
        assert resp.status_code == 200, resp.text
        ref = vtw_generate(
            llava_dir,
            f"USER: <image>\n{question} ASSISTANT:",
            [make_test_image(seed)],
            k,
            MAX_TOKENS,
            add_special_tokens=False,
        )
        assert resp.json()["choices"][0]["token_ids"] == ref.token_ids, f"K={k}"
    body["vllm_xargs"] = {"vtw_k": 3}
    resp = httpx.post(f"{two_node_server['base']}/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 400
