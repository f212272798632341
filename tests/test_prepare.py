"""``vtw-vllm prepare``: the directory it writes and its refusals, no engine.

That vLLM serves a prepared directory as VTW with no ``hf_overrides`` (architecture,
default K, KV groups, outputs equal to the reference) is checked on the engine that
tests/test_calibrate.py starts from one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtw_vllm.config import VTWConfig
from vtw_vllm.prepare import PrepareError, num_layers, prepare
from vtw_vllm.testing import get_fixture


@pytest.fixture(scope="module")
def src() -> Path:
    return get_fixture("llava")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vtw_vllm.cli", "prepare", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _vtw_config(model: Path) -> VTWConfig:
    """What the engine reads: the directory's config as transformers loads it."""
    from transformers import AutoConfig

    return VTWConfig.from_hf_config(AutoConfig.from_pretrained(str(model)))


def test_prepared_dir_is_the_config_plus_links(src, tmp_path):
    out = prepare(src, tmp_path / "vtw", 4)
    config = json.loads((out / "config.json").read_text())
    expected = json.loads((src / "config.json").read_text())
    expected.update(architectures=["LlavaVTWForConditionalGeneration"], vtw_k=4, vtw_allowed_k=[4])
    assert config == expected
    others = sorted(p.name for p in src.iterdir() if p.name != "config.json")
    assert sorted(p.name for p in out.iterdir()) == sorted([*others, "config.json"])
    for name in others:  # linked, not copied
        assert (out / name).is_symlink() and (out / name).resolve() == (src / name).resolve()
    vtw = _vtw_config(out)  # default: K alone, N implied: two KV groups
    assert (vtw.default_k, vtw.allowed_k, vtw.group_starts) == (4, [4, 8], [0, 4])


def test_allowed_k_and_force(src, tmp_path):
    out = tmp_path / "vtw"
    prepare(src, out, 2, allowed_k=[6, 2])
    assert _vtw_config(out).group_starts == [0, 2, 6]
    (out / "stale.bin").symlink_to(src / "config.json")  # from an earlier source, say
    proc = _cli("--model", str(src), "--out", str(out), "--vtw-k", "6", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "vtw_k=6, allowed K [6, 8] (2 KV cache groups)" in proc.stdout
    assert not (out / "stale.bin").exists() and _vtw_config(out).default_k == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vtw-k", "0"], "--vtw-k 0: must be in 1..8"),
        (["--vtw-k", "9"], "--vtw-k 9: must be in 1..8"),
        (["--vtw-k", "4", "--allowed-k", "2", "6"], "--allowed-k [2, 6]: must contain --vtw-k 4"),
        (["--vtw-k", "4", "--allowed-k", "4", "9"], "--allowed-k [9]: must be in 1..8"),
        (["--vtw-k", "4", "--out", "{nonempty}"], "exists and is not empty (--force replaces it)"),
        (["--vtw-k", "4", "--out", "{nonempty}", "--force"], "holds files that prepare did not"),
        (["--vtw-k", "4", "--out", "{src}", "--force"], "is the source model directory"),
        (["--vtw-k", "4", "--model", "{notllava}"], "is not a model VTW serves"),
        (["--vtw-k", "4", "--model", "{empty}"], "no config.json"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(src, tmp_path, args, message):
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "notes.txt").write_text("mine")
    (tmp_path / "notllava").mkdir()
    (tmp_path / "notllava" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "empty").mkdir()
    paths = {"src": src, **{name: tmp_path / name for name in ("nonempty", "notllava", "empty")}}
    args = [a.format(**paths) for a in args]
    defaults = {"--model": str(src), "--out": str(tmp_path / "out")}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    before = {p: p.read_bytes() for p in [*src.iterdir(), *tmp_path.rglob("*")] if p.is_file()}
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for p in before} == before


def test_refusal_from_python(src, tmp_path):
    with pytest.raises(PrepareError, match="must contain"):
        prepare(src, tmp_path / "out", 3, allowed_k=[4])
    assert not (tmp_path / "out").exists()


def test_layer_count_missing_from_the_config(tmp_path):
    """llava-hf/llava-1.5-7b-hf's text_config omits num_hidden_layers (Llama's default 32)."""
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {"model_type": "llama", "vocab_size": 32064},
        "vision_config": {"model_type": "clip_vision_model"},
    }
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert num_layers(tmp_path / "src") == 32
    out = prepare(tmp_path / "src", tmp_path / "out", 16)
    assert json.loads((out / "config.json").read_text())["vtw_allowed_k"] == [16]
    assert os.listdir(out) == ["config.json"]


def test_qwen_checkpoints_map_to_their_vtw_class_and_moe_is_refused(tmp_path):
    from vtw_vllm.calibrate import CalibrationError, vtw_architecture

    for arch, vtw in [
        ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLVTWForConditionalGeneration"),
        ("Qwen3VLForConditionalGeneration", "Qwen3VLVTWForConditionalGeneration"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
        assert vtw_architecture(tmp_path) == vtw
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3VLMoeForConditionalGeneration"]})
    )
    with pytest.raises(CalibrationError, match="Qwen3-VL MoE is not supported yet"):
        vtw_architecture(tmp_path)
