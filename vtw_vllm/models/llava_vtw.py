"""LLaVA and LLaVA-NeXT with Visual Tokens Withdrawal.

vLLM's own LLaVA classes provide the vision tower, projector, multimodal processor and
weight loading; only the language model's layer loop changes. Layers below a request's K
see its vision tokens; at layer K those rows are withdrawn from the flat batch (hidden
states, residual and positions together, one gather per distinct K in the step), and the
deeper layers run on the rest with their ORIGINAL positions (the paper's "Keep" RoPE).
The rows that leave the last layer are scattered back so the runner's logits indexing of
the original flat batch is unchanged.

Every step runs the decoder layers as compiled spans, one per KV layer group
(:mod:`vtw_vllm.models.layer_spans`), with the row gather between spans; a step with
nothing to withdraw (every decode step, text-only prefill) runs the spans back to back,
in their piecewise CUDA graphs on a GPU. A step that withdraws rows runs the same
compiled spans without CUDA graphs (the runner dispatches it so); see the README's
feature table.
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
from vtw_vllm.models.layer_spans import make_layer_spans
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
        # Not registered as submodules: the layers' weights stay where vLLM loads them.
        self._vtw_spans = make_layer_spans(
            vllm_config, text_model.layers, self.vtw_config.group_starts, prefix or "model"
        )
        self._vtw_span_starts = {span.start for span in self._vtw_spans}
        # On CUDA, vLLM hands back the output of a compiled unit's last CUDA graph as a
        # weak reference; the next span's graphs may reuse that memory (as Gemma3n notes).
        self._vtw_clone_between_spans = vllm_config.device_config.device_type == "cuda"
        # Forward calls by path, read by the tests (LLM.apply_model) to prove which ran.
        self.vtw_forward_counts = {"full": 0, "withdrawal": 0}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        plan = None
        if is_forward_context_available():
            plan = get_forward_context().additional_kwargs.get(FORWARD_CONTEXT_KEY)
        if inputs_embeds is None:
            inputs_embeds = self.language_model.model.embed_input_ids(input_ids)
        self.vtw_forward_counts["full" if plan is None else "withdrawal"] += 1
        deepstack = self._vtw_deepstack(inputs_embeds)
        return self._forward_spans(inputs_embeds, positions, plan, deepstack)

    def _vtw_deepstack(self, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
        """Features added to the stream after the first decoder layers, ``[rows, levels,
        hidden]`` (Qwen3-VL's deepstack); None for models without them."""
        return None

    def _forward_spans(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        plan: ModelPlan | None,
        deepstack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        text_model = self.language_model.model
        num_tokens = hidden.shape[0]
        residual = None
        withdrawals = dict(plan.withdrawals) if plan is not None else {}
        if not withdrawals.keys() <= self._vtw_span_starts:
            raise RuntimeError(f"withdrawal at layers {sorted(withdrawals)}: not all span starts")
        last = len(self._vtw_spans) - 1
        for i, span in enumerate(self._vtw_spans):
            keep_index = withdrawals.get(span.start)
            if keep_index is not None:
                hidden, residual, positions = _gather_rows(hidden, residual, positions, keep_index)
                if deepstack is not None:
                    deepstack = deepstack.index_select(0, keep_index)
                if hidden.shape[0] == 0:  # e.g. a prefill chunk holding only vision tokens
                    break
            hidden, residual = span(positions, hidden, residual, deepstack)
            if self._vtw_clone_between_spans and i < last:
                hidden, residual = hidden.clone(), residual.clone()
        if plan is None:
            return text_model.norm(hidden, residual)[0]
        out = hidden.new_zeros((num_tokens, hidden.shape[-1]))
        if hidden.shape[0]:
            hidden, _ = text_model.norm(hidden, residual)
            out.index_copy_(0, plan.out_index, hidden)
        return out


def _gather_rows(
    hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The kept rows of the hidden states, residual and positions. M-RoPE positions
    ([3, rows]: temporal, height, width) keep every row's ORIGINAL 3-D position: the
    columns are gathered (a few int64s per row, beside the kernel's hidden-state gather)."""
    if positions.dim() == 1:
        return gather_rows_auto(hidden, residual, positions, keep)
    hidden, residual, _ = gather_rows_auto(hidden, residual, positions[0], keep)
    return hidden, residual, positions.index_select(1, keep)


class LlavaVTWForConditionalGeneration(VTWModelMixin, LlavaForConditionalGeneration):
    pass


class LlavaNextVTWForConditionalGeneration(VTWModelMixin, LlavaNextForConditionalGeneration):
    pass
