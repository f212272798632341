"""The FLOPs model of benchmarks/flops.py reproduces the paper's figures; its Qwen-VL shapes
are those of the public configs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import (  # noqa: E402
    CLIP_L_336,
    LLAVA_NEXT_VIDEO_7B,
    PAPER_MODELS,
    QWEN2_5_VL_7B,
    QWEN2_5_VL_VIT_448,
    QWEN3_VL_8B,
    QWEN3_VL_VIT_448,
    QWEN_MODELS,
    WHOLE_MODELS,
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


# The fields of Qwen/Qwen2.5-VL-7B-Instruct's public config.json (its text fields sit at
# the top level there), the vision ones completed with transformers' Qwen2_5_VLVisionConfig
# defaults (of these, the hub file names only hidden_size).
QWEN2_5_VL_7B_CONFIG = {
    "text_config": {
        "num_hidden_layers": 28,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "out_hidden_size": 3584,
    },
}
# The public config.json of Qwen/Qwen3-VL-8B-Instruct (the fields the FLOPs model reads).
QWEN3_VL_8B_CONFIG = {
    "text_config": {
        "num_hidden_layers": 36,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 4096,
        "deepstack_visual_indexes": [8, 16, 24],
    },
}


@pytest.mark.parametrize(
    "config, shape, tower, tokens",
    [
        (QWEN2_5_VL_7B_CONFIG, QWEN2_5_VL_7B, QWEN2_5_VL_VIT_448, 256),
        (QWEN3_VL_8B_CONFIG, QWEN3_VL_8B, QWEN3_VL_VIT_448, 196),
    ],
    ids=["qwen2.5-vl-7b", "qwen3-vl-8b"],
)
def test_qwen_shapes_are_the_public_configs(tmp_path, config, shape, tower, tokens):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Shape.from_checkpoint(tmp_path, shape.name) == shape
    assert Tower.from_checkpoint(tmp_path, tower.name, image_size=448) == tower
    assert tower.tokens == tokens  # a 448 x 448 image: 256 (14 px patches) / 196 (16 px)
    with pytest.raises(ValueError):
        Tower.from_checkpoint(tmp_path)  # dynamic resolution: the image size is needed


def test_windowed_layers_attend_within_their_windows():
    assert layer_flops(1024, 8, 16, 64) == 4 * 1024 * 8 * 8 + 2 * 1024 * 64 * 8 + 2 * 1024 * 8 * 16
    assert layer_flops(1024, 8, 16, 1024) == layer_flops(1024, 8, 16)
    global_tower = Tower("global", 32, 1280, 3420, 1024, 3584, merge=4, projector_mid=5120)
    windowed = QWEN2_5_VL_VIT_448
    saved = 28 * (layer_flops(1024, 1280, 3420) - layer_flops(1024, 1280, 3420, 64))
    assert tower_flops(global_tower, 1, 256) - tower_flops(windowed, 1, 256) == saved


def test_projectors():
    # LLaVA: a 2-layer MLP from the tower's width to the LM's, per LM token.
    per_image = 23 * layer_flops(577, 1024, 4096)
    assert tower_flops(CLIP_L_336, 2, 576) == 2 * (per_image + 576 * (1024 * 4096 + 4096**2))
    # Qwen3-VL: 4 mergers (the main one and 3 deepstack ones), each 4 patches of 1152
    # concatenated -> 4608 -> 4096, per LM token.
    per_image = 27 * layer_flops(784, 1152, 4304)
    merger = 4 * 1152 * 4608 + 4608 * 4096
    assert tower_flops(QWEN3_VL_VIT_448, 1, 196) == per_image + 196 * 4 * merger


@pytest.mark.parametrize("model", QWEN_MODELS, ids=lambda m: m[0].name)
def test_qwen_image_saves_less_than_llava(model):
    # 256 / 196 image tokens against LLaVA-1.5's 576: a larger share of text at K = N/2.
    shape, vision, text, k = model
    assert k == shape.num_layers // 2
    llava_15 = ratio(*PAPER_MODELS[0])
    assert llava_15 < ratio(shape, vision, text, k) < 0.65


@pytest.mark.parametrize("model", WHOLE_MODELS, ids=lambda m: f"{m[0].name}, {m[1].name}")
def test_whole_bounds_lie_between_lm_only_and_stock(model):
    shape, tower, count, each, text, k = model
    assert whole_ratio(shape, tower, count, each, text, shape.num_layers) == 1.0
    assert ratio(shape, count * each, text, k) < whole_ratio(shape, tower, count, each, text, k)
    assert whole_ratio(shape, tower, count, each, text, k) < 1.0
