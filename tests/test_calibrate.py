"""KL calibration of K on the real engine (tiny LLaVA-1.5 fixture) and the CLI end to end.

The fixture's random deep layers do attend to the image, so withdrawing it earlier moves
the output further: KL must fall as K grows and be 0 at K = N. The engine's KL is also
checked against the same KL computed from the independent transformers reference.
"""

import base64
import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from vtw_vllm import calibrate as cal
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


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = cal.make_engine(model_dir, layer_group_size=1, **ENGINE_ARGS)
    try:
        yield engine
    finally:  # a later module's engine must not inherit this one's processes
        engine.llm_engine.engine_core.shutdown()


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
    assert max(r.kl[8]) < 1e-9 and min(r.kl[3]) > 0
    assert r.kl[3] != result.kl[3]  # later answer tokens count too
    with pytest.raises(cal.CalibrationError, match=r"not allowed.*\[1, 2, 3"):
        cal.calibrate(model_dir, samples, llm=llm, candidates=[9], progress=False)


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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_cli_end_to_end(model_dir, tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    proc = _cli(
        "--model", str(model), "--data", _data_file(tmp_path), "--candidates", "2", "4", "8",
        "--layer-group-size", "2", "--eta", "0.8", "--plot", str(tmp_path / "kl.png"),
        "--table", str(tmp_path / "kl.md"), "--write-config",
        "--engine-args", json.dumps(ENGINE_ARGS),
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


def test_cli_rejects_a_model_that_is_not_llava(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    proc = _cli("--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "is not a LLaVA model" in proc.stderr


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
