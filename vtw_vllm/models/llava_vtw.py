"""LLaVA and LLaVA-NeXT with Visual Tokens Withdrawal.

vLLM's own LLaVA classes provide the vision tower, projector, multimodal processor and
weight loading; only the language model's layer loop changes. Layers below a request's K
see its vision tokens; at layer K those rows are withdrawn from the flat batch (hidden
states, residual and positions together, one gather per distinct K in the step), and the
deeper layers run on the rest with their ORIGINAL positions (the paper's "Keep" RoPE).
The rows that leave the last layer are scattered back so the runner's logits indexing of
the original flat batch is unchanged. A step with nothing to withdraw is the stock code.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.v1.kv_cache_interface import replace_as

from vtw_vllm import validation
from vtw_vllm.config import VTWConfig
from vtw_vllm.kernels.gather_rows import gather_rows_auto
from vtw_vllm.kv_cache import VTWAttentionSpec
from vtw_vllm.runner import FORWARD_CONTEXT_KEY, ModelPlan
from vtw_vllm.validation import VTWRequestValidator

logger = logging.getLogger(__name__)


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

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        plan = None
        if is_forward_context_available():
            plan = get_forward_context().additional_kwargs.get(FORWARD_CONTEXT_KEY)
        if plan is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        if inputs_embeds is None:
            inputs_embeds = self.language_model.model.embed_input_ids(input_ids)
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


class VTWModelConfigHook(VerifyAndUpdateConfig):
    """Engine settings VTW needs, applied by vLLM before it finalises its config."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        vtw = VTWConfig.from_hf_config(vllm_config.model_config.hf_config)
        logger.info("VTW: default K=%s, allowed K=%s", vtw.default_k, vtw.allowed_k)
        model_config = vllm_config.model_config
        VTWRequestValidator.vtw_config = vtw
        if validation.QUALNAME not in (model_config.logits_processors or []):
            model_config.logits_processors = [
                *(model_config.logits_processors or []),
                validation.QUALNAME,
            ]
        sched = vllm_config.scheduler_config
        if sched.scheduler_cls not in (None, "vtw_vllm.scheduler.VTWScheduler"):
            raise ValueError(f"VTW models need vtw_vllm's scheduler, got {sched.scheduler_cls}")
        sched.scheduler_cls = "vtw_vllm.scheduler.VTWScheduler"
        if sched.disable_hybrid_kv_cache_manager:
            raise ValueError("VTW needs vLLM's hybrid KV cache manager (one group per layer block)")
        sched.disable_hybrid_kv_cache_manager = False
        sched.async_scheduling = False  # the scheduler is a plain (synchronous) Scheduler
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = "vtw_vllm.worker.VTWWorker"
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("VTW does not support pipeline parallelism yet")
        if vllm_config.speculative_config is not None:
            raise ValueError("VTW does not support speculative decoding yet")
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("VTW: prefix caching is off (compacted deep-layer blocks are not hashed)")
            vllm_config.cache_config.enable_prefix_caching = False
        # A request rejected by VTWRequestValidator was already rendered, so its images sit
        # in the front end's multimodal processor cache but never reached the engine's;
        # the next request with the same image would then fail (cache drift). The engine's
        # encoder cache is unaffected by this setting.
        if model_config.multimodal_config is not None:
            model_config.multimodal_config.mm_processor_cache_gb = 0
        # Withdrawal changes the row count inside the model: no torch.compile/CUDA graphs.
        vllm_config.model_config.enforce_eager = True
        # The runner mixin extends vLLM's V1 model runner, which CUDA must then use too.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


class LlavaVTWForConditionalGeneration(VTWModelMixin, LlavaForConditionalGeneration):
    pass


class LlavaNextVTWForConditionalGeneration(VTWModelMixin, LlavaNextForConditionalGeneration):
    pass
