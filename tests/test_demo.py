"""The main job (``make demo``) runs both engines and reports VTW's smaller KV footprint."""

import re
import subprocess
import sys

import pytest


@pytest.mark.engine
def test_demo_prints_stock_and_vtw_side_by_side():
    proc = subprocess.run(
        # Eager: the main job's own code, without two ~40 s compiles (the compiled spans
        # are tested in test_vtw_engine.py, test_video_server.py and test_qwen_vl.py).
        [
            sys.executable,
            "-m",
            "vtw_vllm.demo",
            "--num-prompts",
            "2",
            "--max-tokens",
            "4",
            "--enforce-eager",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "stock vLLM" in out and "VTW K=4" in out
    # Tiny fixture, 8 layers, K = 4: stock holds one 8-layer group, VTW two 4-layer groups,
    # the deep one with a single block (the text tokens only).
    assert "KV cache groups (layers each): stock [8], VTW [4, 4]" in out
    assert len(re.findall(r"KV blocks \[\d+\] .*KV blocks \[\d+, 1\]", out)) == 2
    ratio = float(re.search(r"KV memory held: .*\(([\d.]+)x\)", out).group(1))
    assert ratio < 0.7
