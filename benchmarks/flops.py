"""The FLOPs model VTW (and FastV before it) uses, for stock vs VTW prefill.

Per decoder layer on n tokens with hidden size d and FFN size m:
``4 n d^2 + 2 n^2 d + 2 n d m`` (projections, attention, FFN), as in FastV (Chen et al.
2024), whose accounting the VTW paper follows. Stock runs every layer on all tokens;
VTW runs layers < K on all tokens and layers >= K on the text tokens only. The ratio is
the limit of VTW's prefill speed-up in the language model.

The vision tower and projector run in both engines alike, so the limit of the whole
prefill is lower: :func:`whole_ratio` adds them (same per-layer formula on the tower's
patches, for the layers up to the one LLaVA reads; the projector on the tokens it emits).

    python benchmarks/flops.py          # tables for LLaVA-1.5/NeXT(-Video)-7B and the fixtures
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
    """The vision side as the FLOPs model sees it, per image or video frame."""

    name: str
    num_layers: int  # tower layers run: up to the feature layer LLaVA reads
    hidden: int
    ffn: int
    patches: int  # tokens the tower runs on (patches + CLS)
    lm_hidden: int  # the projector's output width (a 2-layer MLP)

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str | None = None) -> Tower:
        config = json.loads((Path(path) / "config.json").read_text())
        vision, feature_layer = config["vision_config"], config["vision_feature_layer"]
        layers = vision["num_hidden_layers"]
        return cls(
            name or Path(path).name,
            layers + 1 + feature_layer if feature_layer < 0 else feature_layer,
            vision["hidden_size"],
            vision["intermediate_size"],
            (vision["image_size"] // vision["patch_size"]) ** 2 + 1,
            config["text_config"]["hidden_size"],
        )


def layer_flops(n: int, d: int, m: int) -> float:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


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
    per = tower.num_layers * layer_flops(tower.patches, tower.hidden, tower.ffn)
    projector = tokens_each * (tower.hidden * tower.lm_hidden + tower.lm_hidden**2)
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
# (LM, tower, images or frames, LM tokens each, text tokens, K): the video benchmark's
# request (16 frames, 2x2-pooled to 144 tokens) on the real 7B shape, and one image.
WHOLE_MODELS = [
    (LLAVA_NEXT_VIDEO_7B, CLIP_L_336, 16, 144, 60, 16),
    (LLAVA_15_7B, CLIP_L_336, 1, 576, 60, 16),
]

# The video benchmark's checkpoint (built by benchmarks/video.py, which names it from here).
VIDEO_BENCH_CHECKPOINT = "bench-llava_next_video-d512-v1"

PAPER_MODELS = [
    (LLAVA_15_7B, 576, 60, 16),
    (replace(LLAVA_15_7B, name="LLaVA-NeXT-7B"), 2880, 60, 16),
    (Shape("LLaVA-1.5-13B", 40, 5120, 13824), 576, 60, 20),
]


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
        "| model | tower | images or frames x LM tokens + text | K | LM only | with the "
        "vision side | speed-up bound |",
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
    rows, whole = list(PAPER_MODELS), list(WHOLE_MODELS)
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
