"""LLaVA and LLaVA-NeXT with Visual Tokens Withdrawal.

vLLM's own LLaVA classes provide the vision tower, projector, multimodal processor and
weight loading; only the language model's layer loop changes. Layers below a request's K
see its vision tokens; at layer K those rows are withdrawn from the flat batch (hidden
states, residual and positions together, one gather per distinct K in the step), and the
deeper layers run on the rest with their ORIGINAL positions (the paper's "Keep" RoPE).
The rows that leave the last layer are scattered back so the runner's logits indexing of
the original flat batch is unchanged.

A step with nothing to withdraw (every decode step, text-only prefill) is the stock
forward: vLLM's compiled language model, in CUDA graphs where the engine uses them. A
step that withdraws rows runs the layer loop below eagerly (the runner dispatches it
without CUDA graphs); see the README's feature table.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.v1.kv_cache_interface import replace_as

from vtw_vllm.config import VTWConfig
from vtw_vllm.kernels.gather_rows import gather_rows_auto
from vtw_vllm.kv_cache import VTWAttentionSpec
from vtw_vllm.step_plan import FORWARD_CONTEXT_KEY, ModelPlan


class VTWAttention(Attention):
    """vLLM attention whose KV cache spec names its VTW layer group."""

    vtw_first_layer: int

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        return (
            None
            if spec is None
            else replace_as(spec, VTWAttentionSpec, first_layer=self.vtw_first_layer)
        )


class VTWModelMixin:
    """Replaces the language model's layer loop of a vLLM LLaVA-family model."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtw_config = VTWConfig.from_hf_config(vllm_config.model_config.hf_config)
        text_model = self.language_model.model
        if text_model.start_layer != 0 or text_model.end_layer != len(text_model.layers):
            raise NotImplementedError("VTW does not support pipeline parallelism yet")
        for idx, layer in enumerate(text_model.layers):
            layer.self_attn.attn.__class__ = VTWAttention
            layer.self_attn.attn.vtw_first_layer = self.vtw_config.group_start(idx)
        # Forward calls by path, read by the tests (LLM.apply_model) to prove which ran.
        self.vtw_forward_counts = {"stock": 0, "withdrawal": 0}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        plan = None
        if is_forward_context_available():
            plan = get_forward_context().additional_kwargs.get(FORWARD_CONTEXT_KEY)
        if plan is None:
            self.vtw_forward_counts["stock"] += 1
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        if inputs_embeds is None:
            inputs_embeds = self.language_model.model.embed_input_ids(input_ids)
        self.vtw_forward_counts["withdrawal"] += 1
        return self._forward_with_withdrawal(inputs_embeds, positions, plan)

    def _forward_with_withdrawal(
        self, hidden: torch.Tensor, positions: torch.Tensor, plan: ModelPlan
    ) -> torch.Tensor:
        text_model = self.language_model.model
        num_tokens = hidden.shape[0]
        residual = None
        withdrawals = dict(plan.withdrawals)
        for idx, layer in enumerate(text_model.layers):
            keep_index = withdrawals.get(idx)
            if keep_index is not None:
                hidden, residual, positions = gather_rows_auto(
                    hidden, residual, positions, keep_index
                )
            if hidden.shape[0] == 0:  # e.g. a prefill chunk holding only vision tokens
                break
            hidden, residual = layer(positions, hidden, residual)
        out = hidden.new_zeros((num_tokens, hidden.shape[-1]))
        if hidden.shape[0]:
            hidden, _ = text_model.norm(hidden, residual)
            out.index_copy_(0, plan.out_index, hidden)
        return out


class LlavaVTWForConditionalGeneration(VTWModelMixin, LlavaForConditionalGeneration):
    pass


class LlavaNextVTWForConditionalGeneration(VTWModelMixin, LlavaNextForConditionalGeneration):
    pass
