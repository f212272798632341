"""Qwen2.5-VL and Qwen3-VL (dense) with Visual Tokens Withdrawal.

The same contract as :mod:`vtw_vllm.models.llava_vtw`: vLLM's own class provides the
vision tower, merger, multimodal processor, M-RoPE position bookkeeping and weight
loading, and :class:`~vtw_vllm.models.llava_vtw.VTWModelMixin` replaces only the language
model's layer loop (``language_model.model``: vLLM's ``Qwen2Model`` / ``Qwen3LLMModel``,
plain decoder stacks with ``layers``, ``norm``, ``embed_input_ids`` and
``layer(positions, hidden, residual)``).

M-RoPE: the runner hands the model positions as ``[3, tokens]`` (temporal, height,
width); the rows kept at layer K keep their ORIGINAL 3-D positions through every deeper
layer (the paper's "Keep"), the columns being gathered with the rows. Decode positions
come from vLLM's ``mrope_position_delta`` as in stock, since generated tokens are text.

Which tokens are vision: vLLM's Qwen processors put each image's (video's) placeholder
range over its run of ``<|image_pad|>`` (``<|video_pad|>``) tokens; ``<|vision_start|>``
and ``<|vision_end|>`` stay outside the range (Qwen2.5-VL), or inside it with no
embedding (Qwen3-VL's per-frame timestamps and frame brackets: the range's ``is_embed``
mask), so they are text and are never withdrawn.

Qwen3-VL's deepstack: levels 0, 1, 2 of the vision tower's intermediate features are
added to the vision rows' stream after decoder layers 0, 1, 2. They travel with the rows
(gathered at a withdrawal like the hidden states), so a request withdrawn at K <= 2 simply
has no vision row left for the levels >= K: they go with the withdrawn tokens.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from vtw_vllm.models.llava_vtw import VTWModelMixin


class Qwen2_5_VLVTWForConditionalGeneration(VTWModelMixin, Qwen2_5_VLForConditionalGeneration):
    pass


class Qwen3VLVTWForConditionalGeneration(VTWModelMixin, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if vllm_config.model_config.hf_config.model_type == "qwen3_vl_moe":
            raise ValueError("VTW does not support Qwen3-VL MoE yet (dense Qwen3-VL is)")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if getattr(self, "deepstack_input_embeds", None):
            self._resize_deepstack_input_embeds(self.deepstack_input_embeds[0].size(0))

    def _resize_deepstack_input_embeds(self, num_tokens: int) -> None:
        """Stock's per-level buffers become views of one ``[tokens, levels, hidden]``
        buffer, so a step's deepstack input is a slice of it: at a fixed address (CUDA
        graphs replay from the addresses they captured) and contiguous, as the rows
        gathered from it at a withdrawal are (the compiled spans keep one layout)."""
        hidden = self.deepstack_input_embeds[0]
        self._vtw_deepstack_buffer = hidden.new_zeros(
            num_tokens, self.deepstack_num_level, hidden.size(-1)
        )
        self.deepstack_input_embeds = list(self._vtw_deepstack_buffer.unbind(1))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        finally:  # as stock: the step's deepstack features are zeroed for the next step
            if inputs_embeds is not None:
                self._clear_deepstack_input_embeds(inputs_embeds.size(0))

    def _vtw_deepstack(self, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
        if not getattr(self, "deepstack_input_embeds", None):  # no vision tower
            return None
        num_tokens = inputs_embeds.size(0)
        if num_tokens > self._vtw_deepstack_buffer.size(0):
            self._resize_deepstack_input_embeds(num_tokens)
        return self._vtw_deepstack_buffer[:num_tokens]
