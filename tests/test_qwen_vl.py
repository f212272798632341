"""VTW for Qwen2.5-VL and Qwen3-VL on the real vLLM engine (CPU), on their tiny fixtures.

M-RoPE: the model gets positions as [3, tokens]; the rows kept at layer K keep their
original 3-D positions. Which tokens are withdrawn: every ``<|image_pad|>`` /
``<|video_pad|>`` position (vLLM's placeholder ranges, embed positions only);
``<|vision_start|>``, ``<|vision_end|>`` and Qwen3-VL's frame timestamps stay. Qwen3-VL's
deepstack features join the vision rows after decoder layers 0-2: K = 1 and K = 3 are at
or below that depth.

Per family one stock engine (eager) and one VTW engine (``vtw_allowed_k`` [1, 2, 3, 6]: the
K values tested; prefix caching and chunked prefill on; Qwen3-VL's at vLLM's defaults:
compiled layer spans with M-RoPE positions and deepstack features). K = N equals stock
(tokens and log-probs); K < N equals the transformers reference that drops the vision rows
at layer K and keeps the other rows' 3-D positions; a batch of mixed K equals its requests
run alone; text-only requests are untouched; a follow-up turn served from the prefix cache
equals the uncached run. A small eager Qwen3-VL engine checks the KV blocks of every layer
group at every step through chunked prefill, preemption and an abort."""

import json
import math

import numpy as np
import pytest
from conftest import assert_close, first_logprobs, vllm_engine

from vtw_vllm.testing import get_fixture, make_test_image, make_test_video
from vtw_vllm.testing.qwen_fixtures import DEEPSTACK_LEVELS, video_metadata
from vtw_vllm.testing.reference import vtw_generate
from vtw_vllm.vision_ranges import kept_tokens, vision_ranges

pytestmark = pytest.mark.engine
NUM_LAYERS = 8
MAX_TOKENS = 6
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
ARCHS = {
    "qwen2_5_vl": "Qwen2_5_VLVTWForConditionalGeneration",
    "qwen3_vl": "Qwen3VLVTWForConditionalGeneration",
}
LIMIT = {"image": 2, "video": 1}
# K = 1 withdraws before deepstack levels 1 and 2 reach the vision rows; K = 3 after all;
# K = N: the fixture served as stock (K = N equals stock) equals the transformers model.
KS = [1, DEEPSTACK_LEVELS, NUM_LAYERS - 2, NUM_LAYERS]


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


def _prompt(i: int, text: str | None = None, requests: list = REQUESTS) -> dict:
    prompt, spec = requests[i]
    images, videos = _media(spec)
    data = {}
    if images:
        data["image"] = images[0] if len(images) == 1 else images
    if videos:
        data["video"] = (videos[0], video_metadata(len(videos[0])))
    return {"prompt": text or prompt, **({"multi_modal_data": data} if data else {})}


def _params(k: int | None = None, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    extra = None if k is None else {"vtw_k": k}
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, logprobs=-1, extra_args=extra, ignore_eos=True
    )


def _generate(llm, indices: list[int], ks: list[int | None]):
    return llm.generate([_prompt(i) for i in indices], [_params(k) for k in ks], use_tqdm=False)


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def stock(family) -> list:
    with vllm_engine(str(get_fixture(family)), limit_mm_per_prompt=LIMIT) as llm:
        return [_generate(llm, [i], [None])[0] for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def vtw(family, stock):  # after the stock engine is gone
    # Every K the tests use (1, 2, 3, 6 and N): 5 KV groups and compiled spans for
    # Qwen3-VL (one per layer would be 8 compiles).
    overrides = {"architectures": [ARCHS[family]], "vtw_allowed_k": [1, 2, DEEPSTACK_LEVELS, 6]}
    with vllm_engine(
        str(get_fixture(family)),
        limit_mm_per_prompt=LIMIT,
        hf_overrides=overrides,
        # Qwen3-VL at vLLM's default: compiled layer spans with M-RoPE positions and the
        # deepstack features as inputs; Qwen2.5-VL eager (seconds, not ~40 s to compile).
        enforce_eager=family == "qwen2_5_vl",
    ) as llm:
        yield llm


def test_k_equals_n_is_stock(vtw, stock):
    indices = list(range(len(REQUESTS)))
    for ks in ([None] * len(indices), [NUM_LAYERS] * len(indices)):
        for out, ref in zip(_generate(vtw, indices, ks), stock, strict=True):
            assert out.prompt_token_ids == ref.prompt_token_ids
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids, ks
            assert_close(first_logprobs(out), first_logprobs(ref), atol=1e-4, what="logprobs")


@pytest.mark.parametrize("k", KS)
def test_matches_reference(family, vtw, k):
    outputs = _generate(vtw, VISION, [k] * len(VISION))
    for i, out in zip(VISION, outputs, strict=True):
        text, spec = REQUESTS[i]
        images, videos = _media(spec)
        ref = vtw_generate(str(get_fixture(family)), text, images, k, MAX_TOKENS, videos=videos)
        assert out.prompt_token_ids == ref.prompt_token_ids, f"request {i}"
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"request {i}, K={k}"
        vllm_lp = first_logprobs(out)
        assert_close(vllm_lp, ref.first_logprobs[: len(vllm_lp)], atol=1e-3, what=f"req {i}")


def test_questions_are_asked_in_the_chat_template(family):
    from transformers import AutoTokenizer

    from vtw_vllm.prompts import question_prompt

    tokenizer = AutoTokenizer.from_pretrained(get_fixture(family))
    for modality, pad in (("image", IMAGE), ("video", VIDEO), (None, "")):
        prompt = question_prompt(ARCHS[family], tokenizer, modality, "What is it?")
        assert prompt == _chat(f"{pad}What is it?")


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
    indices, ks = [0, 2, 3, 4, 3], [2, 3, NUM_LAYERS, 1, 6]
    batch = _generate(vtw, indices, ks)
    for i, k, out in zip(indices, ks, batch, strict=True):
        (solo,) = _generate(vtw, [i], [k])
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids, f"request {i}, K={k}"
        assert_close(first_logprobs(out), first_logprobs(solo), atol=1e-4, what="logprobs")


# First turns longer than one KV block (the CPU default is 128 tokens): 448 px media.
FIRST_TURNS = [
    (_chat(f"{IMAGE}What is in the picture?"), {"image": [(5, (448, 448))]}),
    (_chat(f"{VIDEO}What happens in the video?"), {"video": (6, 4, (448, 448))}),
]


def test_follow_up_turn_from_the_prefix_cache_equals_uncached(family, vtw):
    i, k = (0, 3) if family == "qwen2_5_vl" else (1, 2)  # an image; a video
    (first,) = vtw.generate([_prompt(i, requests=FIRST_TURNS)], [_params(k)], use_tqdm=False)
    answer = first.outputs[0].text
    follow_up = (
        f"{FIRST_TURNS[i][0]}{answer}<|im_end|>\n"
        "<|im_start|>user\nAnd what colours are there?<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = _prompt(i, follow_up, FIRST_TURNS)
    (cached,) = vtw.generate([prompt], [_params(k)], use_tqdm=False)
    assert cached.num_cached_tokens > 0, "the follow-up missed the prefix cache"
    assert vtw.reset_prefix_cache()
    (uncached,) = vtw.generate([prompt], [_params(k)], use_tqdm=False)
    assert not uncached.num_cached_tokens
    assert cached.outputs[0].token_ids == uncached.outputs[0].token_ids
    assert_close(first_logprobs(cached), first_logprobs(uncached), atol=1e-4, what="logprobs")


# -- KV blocks per layer group: a small eager Qwen3-VL engine -----------------------------

BLOCK_SIZE = 32  # CPU_ATTN needs multiples of 32
DECODE = 16  # tokens per request: the batch grows while it decodes


@pytest.fixture(scope="module")
def small_engine():
    with vllm_engine(
        str(get_fixture("qwen3_vl")),
        limit_mm_per_prompt=LIMIT,
        hf_overrides={
            "architectures": [ARCHS["qwen3_vl"]],
            "vtw_k": 4,
            "vtw_layer_group_size": 2,
        },
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=64,  # chunked prefill: some chunks hold only vision tokens
        # 60 blocks (32 tokens x 2 layers): K = 8 preempts
        kv_cache_memory_bytes=60 * 32 * 2**10,
        max_model_len=256,
    ) as llm:
        yield llm


def test_blocks_follow_formula_every_step_and_return(small_engine):
    """Requests at K = 2 and K = 8 (no withdrawal) in one batch that must preempt."""
    engine = small_engine.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    free_at_start = pool.get_num_free_blocks()
    batch = [(0, 2), (3, 2), (4, 8), (1, 8), (3, 8), (2, 2)]  # (request, K)
    ks = {}
    for n, (i, k) in enumerate(batch):
        ks[f"r{n}"] = k
        engine.add_request(f"r{n}", _prompt(i), _params(k, max_tokens=DECODE))
    engine.add_request("aborted", _prompt(3), _params(2, max_tokens=50))
    # 196 image tokens: some chunk of <= 64 tokens falls inside them.
    engine.add_request("long", _prompt(0, requests=FIRST_TURNS), _params(2, max_tokens=DECODE))
    ks |= {"aborted": 2, "long": 2}

    outputs, checked, vision_only_chunk, preempted, steps = {}, 0, False, set(), 0
    computed: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        steps += 1
        if steps == 8:
            engine.abort_request(["aborted"])
        for req_id, request in sched.requests.items():
            if request.num_preemptions:
                preempted.add(req_id)
            ranges = vision_ranges(request.mm_features)
            n, before = request.num_computed_tokens, computed.get(req_id, 0)
            computed[req_id] = n
            if before < n and any(a <= before and n <= b for a, b in ranges):
                vision_only_chunk = True  # this step's chunk [before, n) held vision only
            k = ks[req_id.rsplit("-", 1)[0]]  # the engine's request ids carry a suffix
            for manager in managers:
                withdrawn = manager.kv_cache_spec.first_layer >= k
                held = kept_tokens(ranges, n) if withdrawn else n
                assert len(manager.req_to_blocks[req_id]) == math.ceil(held / BLOCK_SIZE), (
                    f"{req_id} layer group {manager.kv_cache_spec.first_layer} at {n} tokens"
                )
                checked += 1
    assert checked > 100 and vision_only_chunk and preempted
    assert pool.get_num_free_blocks() == free_at_start
    assert len(outputs) == len(batch) + 1
    # Chunked prefill and preemption: still the reference's tokens (the video at K = 2).
    text, spec = REQUESTS[3]
    _, videos = _media(spec)
    ref = vtw_generate(str(get_fixture("qwen3_vl")), text, [], 2, DECODE, videos=videos)
    assert list(outputs["r1"].outputs[0].token_ids) == ref.token_ids


# -- the tools on a Qwen checkpoint: calibrate (image and video files), evaluate -----------


def test_calibrate_and_evaluate_cli(tmp_path):
    """``vtw-vllm calibrate`` wraps plain questions in Qwen's chat template and sends a
    video file's frames with vLLM's metadata (Qwen-VL's temporal positions need it); its
    KL equals the reference's; ``--out`` writes a Qwen3-VL VTW directory that ``vtw-vllm
    evaluate`` serves at every K asked."""
    from conftest import run_cli

    from vtw_vllm import calibrate as cal
    from vtw_vllm.testing import decode_video, mp4_bytes
    from vtw_vllm.testing.video_files import MP4_FPS

    model = str(get_fixture("qwen3_vl"))
    image = make_test_image(50, size=(224, 224))
    image.save(tmp_path / "a.png")
    (tmp_path / "b.mp4").write_bytes(mp4_bytes(make_test_video(51, num_frames=4, size=(224, 224))))
    rows = [
        {"image": "a.png", "prompt": "Describe the image."},
        {"video": "b.mp4", "prompt": "What happens in the video?"},
    ]
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine_args = json.dumps({"dtype": "float32", "enforce_eager": True, "max_model_len": 2048})
    table, out = tmp_path / "kl.md", tmp_path / "vtw"
    proc = run_cli(
        "calibrate", "--model", model, "--data", str(data), "--candidates", "1", "3", "8",
        "--layer-group-size", "1", "--table", str(table), "--out", str(out),
        "--engine-args", engine_args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 samples" in proc.stdout
    kl = {}
    for line in table.read_text().splitlines()[2:5]:
        cells = [c.strip() for c in line.split("|")]
        kl[int(cells[1].split()[0])] = float(cells[2])
    assert sorted(kl) == [1, 3, 8] and kl[8] < 1e-6 and kl[1] > 0.01
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHS["qwen3_vl"]]
    assert config["vtw_k"] == 8  # no K below N qualifies at eta 0.003 on random weights
    # K = 3 averages the reference's KL of both samples (the video as vLLM decodes the
    # file, its timestamps from the file's frame rate).
    video = decode_video((tmp_path / "b.mp4").read_bytes())
    n = len(video)
    metadata = [{"fps": MP4_FPS, "frames_indices": list(range(n)), "total_num_frames": n}]
    kls = []
    for text, images, videos in (
        (f"{IMAGE}Describe the image.", [image], {}),
        (f"{VIDEO}What happens in the video?", [], {"videos": [video], "video_metadata": metadata}),
    ):
        full, vtw = (
            vtw_generate(model, _chat(text), images, k, 1, **videos).first_logprobs for k in (8, 3)
        )
        kls.append(cal._kl(full.double().numpy(), vtw.double().numpy()))
    assert kl[3] == pytest.approx(np.mean(kls), rel=1e-2)

    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        json.dumps({"image": "a.png", "question": "Describe the image.", "answer": "x"})
        + "\n"
        + json.dumps({"video": "b.mp4", "question": "What happens?", "answer": "y"})
        + "\n"
    )
    proc = run_cli(
        "evaluate", "--model", str(out), "--data", str(qa), "--k", "3", "8",
        "--layer-group-size", "1",
        "--engine-args", engine_args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "| 3 |" in proc.stdout and "| 8 |" in proc.stdout, proc.stdout
