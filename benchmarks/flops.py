"""The FLOPs model VTW (and FastV before it) uses, for stock vs VTW prefill.

Per decoder layer on n tokens with hidden size d and FFN size m:
``4 n d^2 + 2 n^2 d + 2 n d m`` (projections, attention, FFN), as in FastV (Chen et al.
2024), whose accounting the VTW paper follows. Stock runs every layer on all tokens;
VTW runs layers < K on all tokens and layers >= K on the text tokens only. The ratio is
the limit of VTW's prefill speed-up in the language model (vision tower excluded).

    python benchmarks/flops.py          # table for LLaVA-1.5/NeXT-7B and the fixtures
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
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


PAPER_MODELS = [
    (Shape("LLaVA-1.5-7B", 32, 4096, 11008), 576, 60, 16),
    (Shape("LLaVA-NeXT-7B", 32, 4096, 11008), 2880, 60, 16),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "flops.md")
    args = parser.parse_args()
    rows = list(PAPER_MODELS)
    try:
        from vtw_vllm.testing import get_fixture

        fixture = Shape.from_checkpoint(get_fixture("llava"), "tiny LLaVA-1.5 fixture")
        rows.append((fixture, 576, 14, fixture.num_layers // 2))
    except ImportError:  # the table of the paper's models needs nothing installed
        pass
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Prefill FLOPs, stock vs VTW (language model only)\n\n"
        "`python benchmarks/flops.py`; per layer 4nd^2 + 2n^2d + 2ndm (FastV / VTW).\n\n"
        + text
        + "\n"
    )


if __name__ == "__main__":
    main()
