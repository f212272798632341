"""``vtw-vllm calibrate`` and ``vtw-vllm evaluate`` on video samples (the tiny
LLaVA-NeXT-Video fixture): rows with a ``"video"`` (an MP4 file or data URL) instead of an
``"image"``, decoded by vLLM's own video loader as ``vllm serve`` decodes them. The
calibration's KL equals the KL of the transformers reference on the decoded frames."""

import base64
import json
import subprocess

import numpy as np
import pytest
from conftest import run_cli

from vtw_vllm import calibrate as cal
from vtw_vllm.prompts import VIDEO_PROMPT
from vtw_vllm.quality import evaluate as ev
from vtw_vllm.quality.task import normalise
from vtw_vllm.testing import decode_video, get_fixture, make_test_video, mp4_bytes
from vtw_vllm.testing.reference import vtw_generate

PROMPTS = [
    "USER: <video>\nWhat happens in the video? ASSISTANT:",
    "Describe the motion.",  # plain question: wrapped with the model's chat template
]
ENGINE_ARGS = {
    "dtype": "float32",  # the reference comparison needs fp32 logits (CPU default: bf16)
    "max_model_len": 2048,
    "kv_cache_memory_bytes": 32 * 2**20,
    "enforce_eager": True,
}


def _videos(tmp_path) -> list[bytes]:
    """Two MP4s (4 frames of 336 px, 6 frames of 448 x 336), the first also as a file."""
    videos = [
        mp4_bytes(make_test_video(30, num_frames=4)),
        mp4_bytes(make_test_video(31, num_frames=6, size=(448, 336))),
    ]
    (tmp_path / "a.mp4").write_bytes(videos[0])
    return videos


def _url(video: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(video).decode()


def _write(tmp_path, rows: list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _calibration_file(tmp_path) -> tuple[str, list[np.ndarray]]:
    videos = _videos(tmp_path)
    rows = [
        {"video": "a.mp4", "prompt": PROMPTS[0]},
        {"video": _url(videos[1]), "prompt": PROMPTS[1]},
    ]
    return _write(tmp_path, rows), [decode_video(v) for v in videos]


def test_video_rows_are_decoded_as_vllm_serves_them(tmp_path):
    data, frames = _calibration_file(tmp_path)
    samples = cal.load_samples(data)
    assert [s.modality for s in samples] == ["video", "video"]
    assert [s.image for s in samples] == [None, None]
    for sample, expected in zip(samples, frames, strict=True):
        assert np.array_equal(sample.video, expected)
    assert samples[1].video.shape == (6, 336, 448, 3)
    (short,) = cal.load_samples(data, limit=1, num_frames=2)  # uniform: frames 0 and 3
    assert np.array_equal(short.video, frames[0][[0, 3]])
    items = ev.load_eval_file(
        _write(tmp_path, [{"video": "a.mp4", "question": "Does it move?", "answer": "yes"}])
    )
    assert items[0].image is None and np.array_equal(items[0].video, frames[0])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"video": "missing.mp4", "prompt": "hi"}, "video not found"),
        ({"video": "data:video/mp4;base64,bm90IGEgdmlkZW8=", "prompt": "hi"}, "the video"),
        ({"video": "a.mp4", "image": "a.png", "prompt": "hi"}, "expected"),
        ({"video": 3, "prompt": "hi"}, "expected"),
    ],
)
def test_bad_video_rows(tmp_path, row, message):
    _videos(tmp_path)
    with pytest.raises(cal.CalibrationError, match=message):
        cal.load_samples(_write(tmp_path, [row]))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, "--engine-args", json.dumps(ENGINE_ARGS))


@pytest.mark.engine
def test_calibrate_cli_on_videos_equals_the_reference_kl(tmp_path):
    model = str(get_fixture("llava_next_video"))
    data, frames = _calibration_file(tmp_path)
    table = tmp_path / "kl.md"
    proc = _cli(
        "calibrate", "--model", model, "--data", data, "--candidates", "2", "4", "8",
        "--layer-group-size", "2", "--table", str(table),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 samples" in proc.stdout
    rows = {}
    for line in table.read_text().splitlines()[2:5]:
        cells = [c.strip() for c in line.split("|")]
        rows[int(cells[1].split()[0])] = float(cells[2])
    assert sorted(rows) == [2, 4, 8] and rows[8] < 1e-6  # K = N: the standard model
    wrapped = "USER: <video>\nDescribe the motion. ASSISTANT:"  # the fixture's chat template
    for k in (2, 4):
        kls = []
        for prompt, video in zip((PROMPTS[0], wrapped), frames, strict=True):
            full = vtw_generate(model, prompt, [], 8, 1, videos=[video]).first_logprobs
            vtw = vtw_generate(model, prompt, [], k, 1, videos=[video]).first_logprobs
            kls.append(cal._kl(full.double().numpy(), vtw.double().numpy()))
        assert rows[k] == pytest.approx(np.mean(kls), rel=1e-2), k
    assert rows[2] > 0.01  # withdrawing the video after layer 2 changes this model's output


@pytest.mark.engine
def test_evaluate_cli_on_videos(tmp_path):
    """One table row per K; the answers equal the reference's greedy tokens decoded, so
    a video reaching the engine unchanged (or not at all) shows in the accuracy."""
    model = str(get_fixture("llava_next_video"))
    videos = _videos(tmp_path)
    frames = decode_video(videos[0])
    question = "What happens in the video?"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    answers = {}
    for k in (2, 8):
        prompt = VIDEO_PROMPT.format(question=question)
        tokens = vtw_generate(model, prompt, [], k, 8, videos=[frames]).token_ids
        if tokenizer.eos_token_id in tokens:  # the engine stops there
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        answers[k] = tokenizer.decode(tokens, skip_special_tokens=True)
    assert normalise(answers[2]) != normalise(answers[8]), answers
    rows = [
        {"video": "a.mp4", "question": question, "answer": answers[2], "type": "k2"},
        {"video": _url(videos[0]), "question": question, "answer": answers[8], "type": "k8"},
    ]
    table = tmp_path / "acc.md"
    proc = _cli(
        "evaluate", "--model", model, "--data", _write(tmp_path, rows), "--k", "2", "8",
        "--layer-group-size", "2", "--table", str(table),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 questions" in proc.stdout
    lines = table.read_text().splitlines()
    assert lines[0] == "| K | k2 | k8 | all |"
    assert lines[2:] == ["| 2 | 100.0 | 0.0 | 50.0 |", "| 8 | 0.0 | 100.0 | 50.0 |"]
