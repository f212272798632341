"""The FLOPs model VTW (and FastV before it) uses, for stock vs VTW prefill.

Per decoder layer on n tokens with hidden size d and FFN size m:
``4 n d^2 + 2 n^2 d + 2 n d m`` (projections, attention, FFN), as in FastV (Chen et al.
2024), whose accounting the VTW paper follows. Stock runs every layer on all tokens;
VTW runs layers < K on all tokens and layers >= K on the text tokens only. The ratio is
the limit of VTW's prefill speed-up in the language model.

The vision tower and projector run in both engines alike, so the limit of the whole
prefill is lower: :func:`whole_ratio` adds them (same per-layer formula on the tower's
patches, for the layers up to the one LLaVA reads; the projector on the tokens it emits).
Qwen-VL towers: 2 x 2 patches merged into one LM token by an MLP merger (Qwen3-VL: plus
3 deepstack mergers of the same shape), Qwen2.5-VL's windowed blocks attending within
8 x 8-patch windows; a video's frames go through the tower in pairs.

As in FastV, every model is counted with 4 d^2 per token for q/k/v/o (grouped-query
attention's narrower k/v not modelled) and two FFN matrices (a gated MLP's third one
not modelled), the towers too.

    python benchmarks/flops.py   # tables for LLaVA-1.5/NeXT(-Video)-7B, Qwen2.5-VL-7B,
                                 # Qwen3-VL-8B and the fixtures
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Shape:
    """The language model's shape as the FLOPs model sees it."""

    name: str
    num_layers: int
    hidden: int
    ffn: int

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str | None = None) -> Shape:
        config = json.loads((Path(path) / "config.json").read_text())["text_config"]
        return cls(
            name or Path(path).name,
            config["num_hidden_layers"],
            config["hidden_size"],
            config["intermediate_size"],
        )


@dataclass(frozen=True)
class Tower:
    """The vision side as the FLOPs model sees it, per image or video frame (Qwen-VL: per
    image or pair of frames)."""

    name: str
    num_layers: int  # tower layers run: up to the feature layer LLaVA reads
    hidden: int
    ffn: int
    patches: int  # tokens the tower runs on (patches + CLS)
    lm_hidden: int  # the projector's output width (a 2-layer MLP)
    merge: int = 1  # patches per LM token (Qwen-VL: 2 x 2), concatenated into the projector
    projector_mid: int = 0  # the projector's inner width; 0: lm_hidden (LLaVA)
    projectors: int = 1  # Qwen3-VL: the merger and 3 deepstack mergers
    window: int = 0  # patches a windowed layer attends within (Qwen2.5-VL: 8 x 8)
    windowed_layers: int = 0  # layers attending within windows; the rest attend globally

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, name: str | None = None, image_size: int | None = None
    ) -> Tower:
        """From a checkpoint's ``config.json``: LLaVA (the tower's fixed image size), or
        Qwen-VL (dynamic resolution: the tower for ``image_size`` x ``image_size`` images;
        the config must name every vision field, as transformers 5 saves it)."""
        config = json.loads((Path(path) / "config.json").read_text())
        vision = config["vision_config"]
        name = name or Path(path).name
        if "vision_feature_layer" not in config:  # Qwen-VL
            if image_size is None:
                raise ValueError("a Qwen-VL tower needs the image size it runs on")
            merge, patch = vision["spatial_merge_size"] ** 2, vision["patch_size"]
            window = (vision.get("window_size", 0) // patch) ** 2
            return cls(
                name,
                vision["depth"],
                vision["hidden_size"],
                vision["intermediate_size"],
                (image_size // patch) ** 2,
                vision["out_hidden_size"],
                merge=merge,
                projector_mid=merge * vision["hidden_size"],
                projectors=1 + len(vision.get("deepstack_visual_indexes", [])),
                window=window,
                windowed_layers=(
                    vision["depth"] - len(vision.get("fullatt_block_indexes", [])) if window else 0
                ),
            )
        feature_layer = config["vision_feature_layer"]
        layers = vision["num_hidden_layers"]
        return cls(
            name,
            layers + 1 + feature_layer if feature_layer < 0 else feature_layer,
            vision["hidden_size"],
            vision["intermediate_size"],
            (vision["image_size"] // vision["patch_size"]) ** 2 + 1,
            config["text_config"]["hidden_size"],
        )

    @property
    def tokens(self) -> int:
        """LM tokens per image (Qwen-VL: per image or pair of frames)."""
        return self.patches // self.merge


def layer_flops(n: int, d: int, m: int, attended: int | None = None) -> float:
    """One layer on ``n`` tokens, each attending to ``attended`` of them (default all)."""
    a = n if attended is None else attended
    return 4 * n * d * d + 2 * n * a * d + 2 * n * d * m


def prefill_flops(shape: Shape, vision: int, text: int, k: int | None = None) -> float:
    """Prefill FLOPs of the language model; ``k`` None or N means stock."""
    k = shape.num_layers if k is None else k
    full = layer_flops(vision + text, shape.hidden, shape.ffn)
    kept = layer_flops(text, shape.hidden, shape.ffn)
    return k * full + (shape.num_layers - k) * kept


def ratio(shape: Shape, vision: int, text: int, k: int) -> float:
    """VTW's FLOPs as a fraction of stock's."""
    return prefill_flops(shape, vision, text, k) / prefill_flops(shape, vision, text)


def tower_flops(tower: Tower, count: int, tokens_each: int) -> float:
    """Tower and projector for ``count`` images or frames of ``tokens_each`` LM tokens."""
    n, d, m = tower.patches, tower.hidden, tower.ffn
    windowed = layer_flops(n, d, m, min(tower.window, n)) if tower.windowed_layers else 0.0
    per = (tower.num_layers - tower.windowed_layers) * layer_flops(n, d, m)
    per += tower.windowed_layers * windowed
    mid = tower.projector_mid or tower.lm_hidden
    projector = tokens_each * tower.projectors * (tower.merge * d * mid + mid * tower.lm_hidden)
    return count * (per + projector)


def whole_ratio(
    shape: Shape, tower: Tower, count: int, tokens_each: int, text: int, k: int
) -> float:
    """VTW's prefill FLOPs over stock's, the vision side (the same in both) included."""
    vision = count * tokens_each
    side = tower_flops(tower, count, tokens_each)
    return (prefill_flops(shape, vision, text, k) + side) / (
        prefill_flops(shape, vision, text) + side
    )


LLAVA_15_7B = Shape("LLaVA-1.5-7B", 32, 4096, 11008)  # Vicuna-7B, as in the NeXT models
LLAVA_NEXT_VIDEO_7B = replace(LLAVA_15_7B, name="LLaVA-NeXT-Video-7B")
CLIP_L_336 = Tower("CLIP ViT-L/14-336", 23, 1024, 4096, 577, 4096)  # feature layer -2

# Qwen2.5-VL-7B (Qwen/Qwen2.5-VL-7B-Instruct's config.json; of the vision fields below
# it names only hidden_size 1280, the others are transformers' Qwen2_5_VLVisionConfig
# defaults): language model 28 layers, hidden 3584, FFN 18944, 28 heads / 4 KV heads;
# vision 32 blocks, hidden 1280, FFN 3420 (gated), 14 px patches, windows of 112 px
# (8 x 8 patches) in all blocks but 7, 15, 23 and 31; 2 x 2 merger (5120 -> 5120 -> 3584).
# A 448 x 448 image: 1024 patches, 256 LM tokens; a 16-frame 448 x 448 video: 8 frame
# pairs of 256.
QWEN2_5_VL_7B = Shape("Qwen2.5-VL-7B", 28, 3584, 18944)
QWEN2_5_VL_VIT_448 = Tower(
    "Qwen2.5-VL ViT, 448 px",
    32,
    1280,
    3420,
    1024,
    3584,
    merge=4,
    projector_mid=5120,
    window=64,
    windowed_layers=28,
)
# Qwen3-VL-8B (Qwen/Qwen3-VL-8B-Instruct's config.json): language model 36 layers, hidden
# 4096, FFN 12288, 32 heads / 8 KV heads of 128; vision 27 blocks, hidden 1152, FFN 4304,
# 16 px patches, global attention; 2 x 2 merger (4608 -> 4608 -> 4096) and one deepstack
# merger of that shape for each of blocks 8, 16 and 24 (their outputs are added to the
# first 3 decoder layers' vision rows). A 448 x 448 image: 784 patches, 196 LM tokens.
QWEN3_VL_8B = Shape("Qwen3-VL-8B", 36, 4096, 12288)
QWEN3_VL_VIT_448 = Tower(
    "Qwen3-VL ViT, 448 px", 27, 1152, 4304, 784, 4096, merge=4, projector_mid=4608, projectors=4
)
# Qwen3-VL's video: each frame pair's "<t seconds>" timestamp, vision start and end are
# text too (~8 tokens per pair with Qwen's tokenizer).
QWEN3_VIDEO_TEXT = 60 + 8 * 8

# (LM, tower, images or frames, LM tokens each, text tokens, K): the video benchmark's
# request (16 frames, 2x2-pooled to 144 tokens) on the real 7B shape, and one image; the
# Qwen models on one 448 x 448 image and a 16-frame 448 x 448 video (8 frame pairs).
WHOLE_MODELS = [
    (LLAVA_NEXT_VIDEO_7B, CLIP_L_336, 16, 144, 60, 16),
    (LLAVA_15_7B, CLIP_L_336, 1, 576, 60, 16),
    (QWEN2_5_VL_7B, QWEN2_5_VL_VIT_448, 1, 256, 60, 14),
    (replace(QWEN2_5_VL_7B, name="Qwen2.5-VL-7B, video"), QWEN2_5_VL_VIT_448, 8, 256, 60, 14),
    (QWEN3_VL_8B, QWEN3_VL_VIT_448, 1, 196, 60, 18),
    (
        replace(QWEN3_VL_8B, name="Qwen3-VL-8B, video"),
        QWEN3_VL_VIT_448,
        8,
        196,
        QWEN3_VIDEO_TEXT,
        18,
    ),
]

# The video benchmark's checkpoint (built by benchmarks/video.py, which names it from here).
VIDEO_BENCH_CHECKPOINT = "bench-llava_next_video-d512-v1"

PAPER_MODELS = [
    (LLAVA_15_7B, 576, 60, 16),
    (replace(LLAVA_15_7B, name="LLaVA-NeXT-7B"), 2880, 60, 16),
    (Shape("LLaVA-1.5-13B", 40, 5120, 13824), 576, 60, 20),
]
# The Qwen models (not in the paper) on a 448 x 448 image at K = N/2.
QWEN_MODELS = [(QWEN2_5_VL_7B, 256, 60, 14), (QWEN3_VL_8B, 196, 60, 18)]


def table(rows: list[tuple[Shape, int, int, int]]) -> str:
    lines = [
        "| model | layers | vision + text tokens | K | stock TFLOPs | VTW TFLOPs | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, vision, text, k in rows:
        stock = prefill_flops(shape, vision, text) / 1e12
        vtw = prefill_flops(shape, vision, text, k) / 1e12
        lines.append(
            f"| {shape.name} | {shape.num_layers} | {vision} + {text} | {k} | {stock:.3g} | "
            f"{vtw:.3g} | {vtw / stock:.2f}x |"
        )
    return "\n".join(lines)


def whole_table(rows: list[tuple[Shape, Tower, int, int, int, int]]) -> str:
    """The bounds of :data:`WHOLE_MODELS`-style rows, language model only and whole."""
    lines = [
        "| model | tower | images or frames (Qwen: frame pairs) x LM tokens + text | K | "
        "LM only | with the vision side | speed-up bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, tower, count, each, text, k in rows:
        lm = ratio(shape, count * each, text, k)
        whole = whole_ratio(shape, tower, count, each, text, k)
        lines.append(
            f"| {shape.name} | {tower.name} | {count} x {each} + {text} | {k} | {lm:.2f}x | "
            f"{whole:.2f}x | {1 / whole:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "flops.md")
    args = parser.parse_args()
    rows, whole = PAPER_MODELS + QWEN_MODELS, list(WHOLE_MODELS)
    try:
        from vtw_vllm.testing import default_cache_dir, get_fixture

        fixture = Shape.from_checkpoint(get_fixture("llava"), "tiny LLaVA-1.5 fixture")
        rows.append((fixture, 576, 14, fixture.num_layers // 2))
        bench = default_cache_dir() / VIDEO_BENCH_CHECKPOINT
        if (bench / "config.json").is_file():  # its request: 16 frames and 23 text tokens
            shape = Shape.from_checkpoint(bench, "video benchmark checkpoint")
            tower = Tower.from_checkpoint(bench, "tiny CLIP")
            whole.append((shape, tower, 16, 144, 23, shape.num_layers // 2))
    except ImportError:  # the tables of the paper's models need nothing installed
        pass
    text = table(rows) + "\n\nWith the vision tower and projector (run by both engines):\n\n"
    text += whole_table(whole)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Prefill FLOPs, stock vs VTW\n\n"
        "`python benchmarks/flops.py`; per layer 4nd^2 + 2n^2d + 2ndm (FastV / VTW); "
        "language model only, then with the vision side.\n\n" + text + "\n"
    )


if __name__ == "__main__":
    main()
