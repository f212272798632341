"""Qwen2.5-VL with Visual Tokens Withdrawal.

The same contract as :mod:`vtw_vllm.models.llava_vtw`: vLLM's own class provides the
vision tower, merger, multimodal processor, M-RoPE position bookkeeping and weight
loading, and :class:`~vtw_vllm.models.llava_vtw.VTWModelMixin` replaces only the language
model's layer loop (``language_model.model``: vLLM's ``Qwen2Model``, a plain decoder stack
with ``layers``, ``norm``, ``embed_input_ids`` and ``layer(positions, hidden, residual)``).

M-RoPE: the runner hands the model positions as ``[3, tokens]`` (temporal, height,
width); the rows kept at layer K keep their ORIGINAL 3-D positions through every deeper
layer (the paper's "Keep"), the columns being gathered with the rows. Decode positions
come from vLLM's ``mrope_position_delta`` as in stock, since generated tokens are text.

Which tokens are vision: vLLM's Qwen processors put each image's (video's) placeholder
range over its run of ``<|image_pad|>`` (``<|video_pad|>``) tokens; ``<|vision_start|>``
and ``<|vision_end|>`` stay outside the range, so they are text and are never withdrawn.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from vtw_vllm.models.llava_vtw import VTWModelMixin


class Qwen2_5_VLVTWForConditionalGeneration(VTWModelMixin, Qwen2_5_VLForConditionalGeneration):
    pass
