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

Tensor parallelism needs nothing of its own (every rank gathers the same rows). Under
pipeline parallelism each stage runs the spans of its own layers; a stage sends every
row of the step to the next, with the rows it withdrew as zeros (vLLM sizes the stage
transfer by the step's token count), and the next stage withdraws them again.
"""

from __future__ import annotations

import torch
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.sequence import IntermediateTensors
from vllm.v1.kv_cache_interface import replace_as

from vtw_vllm.config import VTWConfig
from vtw_vllm.kernels.gather_rows import gather_rows_auto
from vtw_vllm.kv_cache import VTWAttentionSpec
from vtw_vllm.models.layer_spans import make_layer_spans
from vtw_vllm.models.lora_rows import find_punica_wrapper, keep_lora_rows
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
        # Pipeline parallelism: this stage owns layers [start_layer, end_layer).
        self._vtw_stage = (text_model.start_layer, text_model.end_layer)
        for idx in range(*self._vtw_stage):
            attn = text_model.layers[idx].self_attn.attn
            attn.__class__ = VTWAttention
            attn.vtw_first_layer = self.vtw_config.group_start(idx)
        # Not registered as submodules: the layers' weights stay where vLLM loads them.
        self._vtw_spans = make_layer_spans(
            vllm_config,
            text_model.layers,
            self.vtw_config.group_starts,
            prefix or "model",
            stage=self._vtw_stage,
        )
        self._vtw_span_starts = {span.start for span in self._vtw_spans}
        # On CUDA, vLLM hands back the output of a compiled unit's last CUDA graph as a
        # weak reference; the next span's graphs may reuse that memory (as Gemma3n notes).
        self._vtw_clone_between_spans = vllm_config.device_config.device_type == "cuda"
        # LoRA: vLLM installs its layers (and their shared PunicaWrapper) after the model
        # is built; found at the first withdrawal, then kept. Never looked for without LoRA.
        self._vtw_uses_lora = vllm_config.lora_config is not None
        self._vtw_punica = None
        # Forward calls by path, read by the tests (LLM.apply_model) to prove which ran.
        self.vtw_forward_counts = {"full": 0, "withdrawal": 0}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        plan = None
        if is_forward_context_available():
            plan = get_forward_context().additional_kwargs.get(FORWARD_CONTEXT_KEY)
        self.vtw_forward_counts["full" if plan is None else "withdrawal"] += 1
        if not get_pp_group().is_first_rank:  # a later pipeline stage: every row arrives
            hidden = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
            return self._forward_spans(hidden, positions, plan, residual=residual)
        if inputs_embeds is None:
            inputs_embeds = self.language_model.model.embed_input_ids(input_ids)
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
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """This stage's spans, withdrawing rows at the plan's layers. Under pipeline
        parallelism every stage receives and sends all rows of the step (vLLM's stage
        transfer and its buffers are sized by the step's token count): a later stage
        first withdraws the rows earlier stages withdrew, and a stage that is not the
        last scatters its rows back into place (withdrawn rows are zeros, never read)."""
        text_model = self.language_model.model
        num_tokens = hidden.shape[0]
        stage_start, stage_end = self._vtw_stage
        withdrawals = plan.withdrawals if plan is not None else []
        earlier = [keep for layer, keep in withdrawals if layer < stage_start]
        here = {layer: keep for layer, keep in withdrawals if stage_start <= layer < stage_end}
        if not here.keys() <= self._vtw_span_starts:
            raise RuntimeError(f"withdrawal at layers {sorted(here)}: not all span starts")
        alive = None  # original rows of the current rows, once any has left
        for keep in earlier:
            alive = keep if alive is None else alive.index_select(0, keep)
        lora = self._vtw_lora_wrapper() if withdrawals else None
        if alive is not None:
            hidden, residual, positions = _gather_rows(hidden, residual, positions, alive)
            if lora is not None and hidden.shape[0]:
                keep_lora_rows(lora, alive)
        last = len(self._vtw_spans) - 1
        for i, span in enumerate(self._vtw_spans):
            keep_index = here.get(span.start)
            if keep_index is not None:
                hidden, residual, positions = _gather_rows(hidden, residual, positions, keep_index)
                if deepstack is not None:
                    deepstack = deepstack.index_select(0, keep_index)
                alive = keep_index if alive is None else alive.index_select(0, keep_index)
                if hidden.shape[0] == 0:  # e.g. a prefill chunk holding only vision tokens
                    break
                if lora is not None:
                    keep_lora_rows(lora, keep_index)
            hidden, residual = span(positions, hidden, residual, deepstack)
            if self._vtw_clone_between_spans and i < last:
                hidden, residual = hidden.clone(), residual.clone()
        if not get_pp_group().is_last_rank:
            if alive is not None:
                hidden = _scatter_rows(hidden, alive, num_tokens)
                residual = _scatter_rows(residual, alive, num_tokens)
            return IntermediateTensors({"hidden_states": hidden, "residual": residual})
        if plan is None:
            return text_model.norm(hidden, residual)[0]
        out = hidden.new_zeros((num_tokens, hidden.shape[-1]))
        if hidden.shape[0]:
            hidden, _ = text_model.norm(hidden, residual)
            out.index_copy_(0, plan.out_index, hidden)
        return out

    def _vtw_lora_wrapper(self):
        if self._vtw_uses_lora and self._vtw_punica is None:
            self._vtw_punica = find_punica_wrapper(self._vtw_spans[0].layers)
        return self._vtw_punica


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``rows`` back at their original ``index`` in a zeroed ``[num_tokens, ...]``."""
    out = rows.new_zeros((num_tokens, *rows.shape[1:]))
    return out.index_copy_(0, index, rows) if rows.shape[0] else out


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
