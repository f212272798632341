"""The FLOPs model of benchmarks/flops.py reproduces the paper's figures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import PAPER_MODELS, Shape, layer_flops, prefill_flops, ratio  # noqa: E402


def test_layer_flops_formula():
    # 4nd^2 + 2n^2d + 2ndm with n=2, d=3, m=5
    assert layer_flops(2, 3, 5) == 4 * 2 * 9 + 2 * 4 * 3 + 2 * 2 * 3 * 5


def test_k_equals_n_is_stock():
    shape = Shape("x", 8, 64, 128)
    assert prefill_flops(shape, 576, 20, 8) == prefill_flops(shape, 576, 20)
    assert ratio(shape, 576, 20, 8) == 1.0


@pytest.mark.parametrize("model", PAPER_MODELS, ids=lambda m: m[0].name)
def test_paper_models_save_about_45_percent(model):
    shape, vision, text, k = model
    # The paper: ~45% fewer FLOPs at K = N/2 (LLaVA-1.5: 576 vision + ~60 text tokens).
    assert 0.5 <= ratio(shape, vision, text, k) <= 0.56
