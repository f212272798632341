"""The FLOPs model of benchmarks/flops.py reproduces the paper's figures."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import (  # noqa: E402
    CLIP_L_336,
    LLAVA_NEXT_VIDEO_7B,
    PAPER_MODELS,
    Shape,
    Tower,
    layer_flops,
    prefill_flops,
    ratio,
    tower_flops,
    whole_ratio,
)


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


def test_vision_side_lowers_the_bound_and_k_equals_n_is_stock():
    assert whole_ratio(LLAVA_NEXT_VIDEO_7B, CLIP_L_336, 16, 144, 60, 32) == 1.0
    lm_only, whole = (
        ratio(LLAVA_NEXT_VIDEO_7B, 16 * 144, 60, 16),
        whole_ratio(LLAVA_NEXT_VIDEO_7B, CLIP_L_336, 16, 144, 60, 16),
    )
    side = tower_flops(CLIP_L_336, 16, 144)
    stock = prefill_flops(LLAVA_NEXT_VIDEO_7B, 16 * 144, 60)
    assert whole == pytest.approx((lm_only * stock + side) / (stock + side))
    assert lm_only < whole < 1.0


def test_tower_from_checkpoint_counts_layers_up_to_the_feature_layer(tmp_path):
    vision = {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096}
    vision |= {"image_size": 336, "patch_size": 14}
    config = {"vision_config": vision, "vision_feature_layer": -2}
    config["text_config"] = {"hidden_size": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Tower.from_checkpoint(tmp_path, CLIP_L_336.name) == CLIP_L_336
