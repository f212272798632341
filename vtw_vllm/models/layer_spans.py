"""Decoder-layer spans compiled one by one, so steps that withdraw rows are compiled too.

vLLM compiles a LLaVA language model as one graph over one row count. VTW changes the row
count at a request's K, and K is always the first layer of a KV cache group; so the
decoder layers are split at the group boundaries into spans, each compiled by vLLM as a
unit of its own (``@support_torch_compile``, its own model tag), and the row gather runs
between two spans. vLLM's precedent is Gemma3n's ``kv_sharing_fast_prefill``: a self- and
a cross-decoder compiled separately, the second on fewer rows.

Every step runs through the spans. A step without withdrawal runs them back to back (on
CUDA each span replays its piecewise CUDA graphs); a step that withdraws rows runs the
same compiled code on fewer rows after each gather, without CUDA graphs (the runner
dispatches it so).

Each span is its own class: vLLM keys its AOT compile cache by the qualified name of the
compiled ``forward``, so spans sharing one class would load each other's artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile

# Every input of a span has the step's row count as one dim (one symbol, "rows"): dim 0 of
# the hidden states, the last dim of the positions ([rows], or [3, rows] for M-RoPE), dim 0
# of Qwen3-VL's deepstack features ([rows, levels, hidden]).
_DYNAMIC_DIMS = {
    "positions": {-1: "rows"},
    "hidden_states": {0: "rows"},
    "residual": {0: "rows"},
    "deepstack": {0: "rows"},
}


class _LayerSpanBase(nn.Module):
    """Decoder layers [start, end); holds them without registering them again (their
    weights stay under the language model)."""

    def __init__(self, *, vllm_config, prefix: str = "", layers: Sequence[nn.Module], start: int):
        super().__init__()
        self.layers = tuple(layers)
        self.start = start


def _span_class(start: int, end: int) -> type[_LayerSpanBase]:
    name = f"VTWLayers{start}To{end}"

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        deepstack: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for idx, layer in enumerate(self.layers, start=self.start):
            hidden_states, residual = layer(positions, hidden_states, residual)
            # Qwen3-VL: level i of the deepstack features (zero on all but vision rows)
            # joins the stream after decoder layer i, as in vLLM's Qwen3LLMModel.
            if deepstack is not None and idx < deepstack.shape[1]:
                hidden_states = hidden_states + deepstack[:, idx]
        return hidden_states, residual

    forward.__qualname__ = f"{name}.forward"
    cls = type(name, (_LayerSpanBase,), {"forward": forward, "__qualname__": name})
    return support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)(cls)


def make_layer_spans(
    vllm_config,
    layers: Sequence[nn.Module],
    starts: Sequence[int],
    prefix: str,
    stage: tuple[int, int] | None = None,
) -> list[_LayerSpanBase]:
    """One compiled span per KV layer group within this pipeline stage's layers
    ``stage = (start_layer, end_layer)`` (all layers without pipeline parallelism);
    ``starts`` are the groups' first layers. A group cut by a stage boundary gives one
    span on each side."""
    from vllm.compilation.backends import set_model_tag

    first, last = stage if stage is not None else (0, len(layers))
    bounds = sorted({first, *(s for s in starts if first < s < last)}) + [last]
    spans = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        tag = f"vtw_layers_{start}_{end}"
        with set_model_tag(tag):
            spans.append(
                _span_class(start, end)(
                    vllm_config=vllm_config,
                    prefix=f"{prefix}.{tag}",
                    layers=list(layers[start:end]),
                    start=start,
                )
            )
    return spans
