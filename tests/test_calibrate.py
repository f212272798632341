"""KL calibration of K on the real engine (tiny LLaVA-1.5 fixture) and the CLI end to end.

The fixture's random deep layers do attend to the image, so withdrawing it earlier moves
the output further: KL must fall as K grows and be 0 at K = N. The engine's KL is also
checked against the same KL computed from the independent transformers reference.

The module's engine is started as a user serves a ``vtw-vllm prepare`` directory:
``LLM(model=DIR)`` with no ``hf_overrides`` (every K allowed, default K = 4), so the same
engine also shows that vLLM serves such a directory as VTW.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, run_cli, vllm_engine

from vtw_vllm import calibrate as cal
from vtw_vllm.config import VTWConfig
from vtw_vllm.prepare import prepare
from vtw_vllm.testing import get_fixture, make_test_image
from vtw_vllm.testing.reference import vtw_generate

pytestmark = pytest.mark.engine
PROMPTS = [
    "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "USER: <image>\nWhich colour dominates? ASSISTANT:",
    "Describe the image.",  # plain question: wrapped with the model's chat template
]
ENGINE_ARGS = {
    "dtype": "float32",  # the reference comparison needs fp32 logits (CPU default: bf16)
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 64 * 2**20,
    "enforce_eager": True,
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(get_fixture("llava"))


@pytest.fixture(scope="module")
def samples() -> list[cal.CalibrationSample]:
    return [cal.CalibrationSample(make_test_image(40 + i), p) for i, p in enumerate(PROMPTS)]


DEFAULT_K = 4
APPLY_MODEL = "VLLM_ALLOW_INSECURE_SERIALIZATION"  # LLM.apply_model in a test


@pytest.fixture(scope="module")
def prepared_dir(model_dir, tmp_path_factory) -> Path:
    """Every K allowed (calibration tries them all), default K = 4."""
    out = tmp_path_factory.mktemp("prepared") / "llava-vtw"
    return prepare(model_dir, out, DEFAULT_K, allowed_k=range(1, 9))


@pytest.fixture(scope="module")
def llm(prepared_dir):
    """``LLM(model=DIR)``, no ``hf_overrides`` (in-process engine core)."""
    with vllm_engine(str(prepared_dir), max_logprobs=-1, **ENGINE_ARGS) as engine:
        yield engine


@pytest.fixture(scope="module")
def result(model_dir, samples, llm) -> cal.CalibrationResult:
    return cal.calibrate(model_dir, samples, llm=llm, progress=False)


def test_kl_is_zero_at_n_and_grows_as_k_falls(result):
    assert sorted(result.kl) == list(range(1, 9))
    assert max(result.kl[8]) < 1e-9
    means = [result.mean_kl(k) for k in range(1, 9)]
    assert means[0] > means[3] > means[6] > means[7] == 0, means  # K = 1 > N/2 > N-1 > N
    ranks = np.argsort(np.argsort(means))  # Spearman: KL falls as K grows
    assert np.corrcoef(ranks, np.arange(8))[0, 1] < -0.9, means
    assert means[0] > 0.1  # withdrawing after layer 0 really changes this model's output


def test_kl_equals_the_transformers_reference(model_dir, samples, result):
    """KL(P_N || P_K) from the engine == the same KL from the reference implementation."""
    sample = samples[0]
    full = vtw_generate(model_dir, sample.prompt, [sample.image], 8, 1).first_logprobs
    for k in (2, 5):
        vtw = vtw_generate(model_dir, sample.prompt, [sample.image], k, 1).first_logprobs
        expected = cal._kl(full.double().numpy(), vtw.double().numpy())
        assert result.kl[k][0] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_chosen_k_is_the_first_under_eta(result):
    means = {k: result.mean_kl(k) for k in result.kl}
    eta = float(np.sqrt(means[5] * means[6]))  # between KL(5) and KL(6)
    assert replace(result, eta=eta).chosen_k == 6
    assert replace(result, eta=1e-12).chosen_k == 8  # only K = N (KL 0) passes
    assert replace(result, eta=1e3).chosen_k == 1
    table = replace(result, eta=eta).to_markdown()
    assert "| 6 **(chosen)** |" in table and "chosen K = 6 of 8" in table


def test_teacher_forced_tokens_and_candidates(model_dir, samples, llm, result):
    r = cal.calibrate(model_dir, samples, llm=llm, candidates=[8, 3], num_tokens=3, progress=False)
    assert sorted(r.kl) == [3, 8] and r.num_tokens == 3
    # K = N is the standard model: KL 0 up to float noise (the teacher-forced steps run
    # in other batch shapes than the standard answers: ~1e-8 on an Intel Xeon here).
    assert max(r.kl[8]) < 1e-6 and min(r.kl[3]) > 1e-3
    assert r.kl[3] != result.kl[3]  # later answer tokens count too
    with pytest.raises(cal.CalibrationError, match=r"not allowed.*\[1, 2, 3"):
        cal.calibrate(model_dir, samples, llm=llm, candidates=[9], progress=False)


def _group_starts(model) -> list[int]:
    """First layer of the KV cache group of each decoder layer's attention."""
    return sorted(
        {layer.self_attn.attn.vtw_first_layer for layer in model.language_model.model.layers}
    )


def test_prepared_dir_serves_vtw_without_overrides(model_dir, llm):
    """Architecture, default K and KV groups come from the directory's config.json, and
    a request without a K runs at the default K = 4 (the reference's tokens and
    log-probs), another at K = 2 through ``extra_args``."""
    from vllm import SamplingParams

    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    assert hf_config.architectures == ["LlavaVTWForConditionalGeneration"]
    vtw = VTWConfig.from_hf_config(hf_config)
    assert vtw.default_k == DEFAULT_K and vtw.allowed_k == list(range(1, 9))
    assert llm.apply_model(_group_starts) == [vtw.group_starts]

    image = make_test_image(60)
    request = {"prompt": PROMPTS[0], "multi_modal_data": {"image": image}}
    params = [
        SamplingParams(temperature=0.0, max_tokens=4, logprobs=-1, extra_args=extra)
        for extra in (None, {"vtw_k": 2})
    ]
    outputs = llm.generate([request, request], params, use_tqdm=False)
    full = vtw_generate(model_dir, PROMPTS[0], [image], 8, 4)
    for out, k in zip(outputs, (DEFAULT_K, 2), strict=True):
        ref = vtw_generate(model_dir, PROMPTS[0], [image], k, 4)
        assert list(out.outputs[0].token_ids) == ref.token_ids, f"K={k}"
        first = out.outputs[0].logprobs[0]
        lp = torch.tensor([first[t].logprob for t in range(len(ref.first_logprobs))])
        assert_close(lp, ref.first_logprobs, atol=1e-3, what=f"K={k} logprobs")
        assert (lp - full.first_logprobs).abs().max() > 1e-2  # not the stock model's


def test_job_engine_args(model_dir, tmp_path, monkeypatch):
    """CPU: a KV cache for CPU_KV_SEQUENCES full-length sequences (64 MiB floor) and
    max_model_len <= 4096, unless the caller sizes it; a GPU keeps vLLM's defaults."""
    from vllm.platforms import current_platform

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    assert cal.job_engine_args(model_dir, {}) == {
        "max_model_len": 4096,
        "kv_cache_memory_bytes": cal.CPU_KV_FLOOR,  # 2 x 8 x 2 x 32 x 2 B x 4 x 4096 = 32 MiB
    }
    big = {  # LLaVA-1.5-7B's language model (its config omits these: Llama's defaults)
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {"model_type": "llama", "max_position_embeddings": 2048},
        "vision_config": {"model_type": "clip_vision_model"},
    }
    (tmp_path / "config.json").write_text(json.dumps(big))
    per_token = 2 * 32 * 32 * 128  # layers x KV heads x head dim, K and V
    for dtype, size in (("float16", 2), ("float32", 4), (torch.bfloat16, 2)):
        args = cal.job_engine_args(tmp_path, {"dtype": dtype, "seed": 0})
        assert args == {
            "dtype": dtype,
            "seed": 0,
            "max_model_len": 2048,  # the model's, below 4096
            "kv_cache_memory_bytes": per_token * size * cal.CPU_KV_SEQUENCES * 2048,
        }
    fp8 = cal.job_engine_args(tmp_path, {"kv_cache_dtype": "fp8", "max_model_len": 512})
    assert fp8["kv_cache_memory_bytes"] == per_token * 1 * cal.CPU_KV_SEQUENCES * 512
    for sized in ({"kv_cache_memory_bytes": 2**20}, {"gpu_memory_utilization": 0.5}):
        assert cal.job_engine_args(tmp_path, sized) == {**sized, "max_model_len": 2048}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert cal.job_engine_args(tmp_path, {}) == {"max_model_len": 2048}
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    assert cal.job_engine_args(tmp_path, {"seed": 0}) == {"seed": 0}


def test_plot_is_written(result, tmp_path):
    path = cal.plot_kl(result, tmp_path / "kl.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _data_file(tmp_path) -> str:
    make_test_image(50).save(tmp_path / "a.png")
    buf = io.BytesIO()
    make_test_image(51).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rows = [{"image": "a.png", "prompt": PROMPTS[0]}, {"image": url, "prompt": PROMPTS[1]}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vtw_vllm.cli", "calibrate", *args]
    env = {k: v for k, v in os.environ.items() if k != APPLY_MODEL}  # as a user runs it
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_cli_end_to_end(model_dir, tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    proc = run_cli(
        "calibrate",
        "--model", str(model), "--data", _data_file(tmp_path), "--candidates", "2", "4", "8",
        "--layer-group-size", "2", "--eta", "0.8", "--plot", str(tmp_path / "kl.png"),
        "--table", str(tmp_path / "kl.md"), "--write-config", "--out", str(tmp_path / "vtw"),
        "--engine-args", json.dumps(ENGINE_ARGS), unset=(APPLY_MODEL,),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 samples" in proc.stdout
    table = (tmp_path / "kl.md").read_text()
    chosen = int(table.split("chosen K = ")[1].split()[0])
    rows = {
        int(line.split("|")[1].split()[0]): line for line in table.splitlines()[2:10] if "|" in line
    }
    assert sorted(rows) == [2, 4, 8] and "(chosen)" in rows[chosen]
    config = json.loads((model / "config.json").read_text())
    assert config["vtw_k"] == chosen and config["vtw_layer_group_size"] == 2
    assert (tmp_path / "kl.png").stat().st_size > 1000
    # --out: a prepared directory with the chosen K, weights linked to the model
    prepared = json.loads((tmp_path / "vtw" / "config.json").read_text())
    assert prepared["architectures"] == ["LlavaVTWForConditionalGeneration"]
    assert prepared["vtw_k"] == chosen and prepared["vtw_allowed_k"] == [chosen]
    weights = (tmp_path / "vtw" / "model.safetensors").resolve()
    assert weights == (model / "model.safetensors").resolve()
    assert f"wrote {tmp_path / 'vtw'}: LlavaVTWForConditionalGeneration" in proc.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no samples"),
        ('{"image": "a.png", "prompt": "hi"}\nnot json\n', "data.jsonl:2: not valid JSON"),
        ('{"image": "missing.png", "prompt": "hi"}\n', "image not found"),
        ('{"image": "a.png"}\n', '"prompt" must be a non-empty string'),
    ],
)
def test_cli_rejects_bad_data_before_starting_an_engine(model_dir, tmp_path, content, message):
    make_test_image(1).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(content)
    proc = _cli("--model", model_dir, "--data", str(tmp_path / "data.jsonl"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "vLLM" not in proc.stdout


def test_cli_rejects_a_non_empty_out_before_starting_an_engine(model_dir, tmp_path):
    make_test_image(1).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "prompt": "hi"}\n')
    data = str(tmp_path / "data.jsonl")
    proc = _cli("--model", model_dir, "--data", data, "--out", str(tmp_path))
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr, proc.stderr[-2000:]
    assert "vLLM" not in proc.stdout


def test_cli_rejects_a_model_that_is_not_llava(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    proc = _cli("--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "is not a model VTW serves" in proc.stderr


def test_folder_of_images_with_one_prompt(tmp_path):
    for i in range(3):
        make_test_image(i).save(tmp_path / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("What is it?\n")
    samples = cal.load_samples(tmp_path, limit=2)
    assert [s.prompt for s in samples] == ["What is it?"] * 2
    (tmp_path / "prompts.txt").write_text("2.png\tFirst?\n0.png\tSecond?\n")
    samples = cal.load_samples(tmp_path)
    assert [s.prompt for s in samples] == ["First?", "Second?"]
    assert np.array_equal(np.asarray(samples[0].image), np.asarray(make_test_image(2)))


def test_calib_data_tool_writes_what_calibrate_reads(tmp_path):
    from vtw_vllm.testing.__main__ import main

    main(["calib-data", "--out", str(tmp_path), "--samples", "5"])
    samples = cal.load_samples(tmp_path / "prompts.jsonl")
    assert len(samples) == 5 and samples[0].image.size == (336, 336)
    assert all("<image>" in s.prompt for s in samples)
