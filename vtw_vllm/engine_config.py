"""The engine settings VTW models need, applied by vLLM before it finalises its config.

vLLM calls :meth:`VTWEngineConfigHook.verify_and_update_config` for the VTW
architectures (registered in ``MODELS_CONFIG_MAP``, see :mod:`vtw_vllm.vllm_patches`)
early in ``VllmConfig.__post_init__``, before the platform and the optimisation level
fill in their defaults. It changes only what VTW cannot run with and says so:

- scheduler, worker and request validator are VTW's (the scheduler picks vLLM's
  synchronous or async base once the engine has decided async scheduling);
- torch.compile stays on: steps without a withdrawal run the compiled model;
- CUDA graphs: FULL graphs replay attention metadata from the addresses captured, and
  the compacted KV groups build theirs fresh each step, so FULL modes become PIECEWISE
  (attention outside the graphs, reading the forward context), with a log line;
- prefix caching stays on (the VTW scheduler and KV managers key compacted blocks by
  prefix and K, :mod:`vtw_vllm.kv_cache`); KV connectors and KV events are refused;
- the multimodal processor cache stays on (a rejected request's images are dropped
  from it, :func:`vtw_vllm.vllm_patches.forget_rejected_request_images`);
- tensor, pipeline and data parallelism run as in stock (pipeline parallelism on the CPU
  build only compiled, as stock); LoRA runs (each row's adapter follows it through a
  withdrawal, :mod:`vtw_vllm.models.lora_rows`); speculative decoding runs with the
  n-gram proposer, other methods, microbatching (DBO) and context parallelism are
  refused;
- on CUDA the attention backend is FLASH_ATTN (16-bit) or TRITON_ATTN (fp32) unless the
  user names one of them (FlashInfer is refused).
"""

from __future__ import annotations

import logging

from vllm.config.compilation import CUDAGraphMode
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vtw_vllm import validation
from vtw_vllm.config import VTWConfig
from vtw_vllm.vllm_patches import use_v1_model_runner

logger = logging.getLogger(__name__)

SCHEDULER = "vtw_vllm.scheduler.make_vtw_scheduler"
WORKER = "vtw_vllm.worker.VTWWorker"


class VTWEngineConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        vtw = VTWConfig.from_hf_config(vllm_config.model_config.hf_config)
        vtw.log_layout()
        model_config = vllm_config.model_config
        validation.VTWRequestValidator.vtw_config = vtw
        # vLLM refuses custom logits processors with speculative decoding; vtw_k is then
        # checked only where the request is rendered (validation.validate_request).
        speculative = vllm_config.speculative_config is not None
        if not speculative and validation.QUALNAME not in (model_config.logits_processors or []):
            model_config.logits_processors = [
                *(model_config.logits_processors or []),
                validation.QUALNAME,
            ]

        sched = vllm_config.scheduler_config
        if sched.scheduler_cls not in (None, SCHEDULER):
            raise ValueError(f"VTW models need vtw_vllm's scheduler, got {sched.scheduler_cls}")
        sched.scheduler_cls = SCHEDULER
        if sched.disable_hybrid_kv_cache_manager:
            raise ValueError("VTW needs vLLM's hybrid KV cache manager (one group per layer span)")
        sched.disable_hybrid_kv_cache_manager = False

        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER
        _refuse_speculation_but_ngram(vllm_config.speculative_config)
        _refuse_unsupported(vllm_config)
        _choose_attention_backend(vllm_config.attention_config, vllm_config.model_config.dtype)

        # Prefix caching stays as the user set it (vLLM's default: on); the VTW scheduler
        # does the lookup, which KV connectors (disaggregated prefill, offloading) bypass,
        # and compacted blocks carry keys that KV-cache events would report unpaired.
        if vllm_config.kv_transfer_config is not None:
            raise ValueError("VTW does not support KV connectors (kv_transfer_config) yet")
        events = vllm_config.kv_events_config
        if events is not None and events.enable_kv_cache_events:
            raise ValueError("VTW does not support KV cache events (kv_events_config) yet")

        _use_piecewise_cuda_graphs(vllm_config.compilation_config)
        # The runner mixin extends vLLM's V1 model runner, which CUDA must then use too;
        # VTWWorker refuses to start if the config still says V2.
        use_v1_model_runner()


def _refuse_speculation_but_ngram(speculative_config) -> None:
    """n-gram speculation proposes from the tokens alone; its verification steps are
    several text rows per request, which every KV group (compacted ones included) takes
    as it takes a chunk. Methods with a draft model (EAGLE, MTP, Medusa, a draft LLM)
    read the target's hidden states or add KV layers of their own: not yet checked."""
    if speculative_config is not None and speculative_config.method != "ngram":
        raise ValueError(
            f"VTW supports n-gram speculative decoding (method 'ngram'), not yet "
            f"'{speculative_config.method}': draft-model methods read the target model's "
            f"hidden states (which VTW withdraws rows from) or run KV layers of their own"
        )


# Attention backends whose metadata takes a compacted batch as it is: every request's
# query rows by query_start_loc, zero-row requests included, no decode/prefill split
# by query length (FlashInfer splits, and a compacted request with 0 rows in a step would
# be taken for a decode: silently wrong attention).
SUPPORTED_ATTENTION_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "CPU_ATTN")


def _refuse_unsupported(vllm_config) -> None:
    """Features that reinterpret the rows of a step, which VTW compacts mid-model."""
    parallel = vllm_config.parallel_config
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
        raise ValueError(
            "VTW does not compose with EVS video pruning (--video-pruning-rate) yet: VTW "
            "would withdraw the video tokens EVS keeps, but that is not yet checked "
            "against an independent reference; start without --video-pruning-rate"
        )
    if parallel.pipeline_parallel_size > 1 and vllm_config.model_config.enforce_eager:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            raise ValueError(
                "On vLLM 0.32's CPU build, pipeline parallelism needs torch.compile (vLLM's "
                "default): with --enforce-eager its CPU runner never allocates the buffers a "
                "later stage receives into, and stock vLLM fails the same way at the first "
                "step; start without --enforce-eager"
            )
    if parallel.enable_dbo or parallel.ubatch_size > 1:
        raise ValueError("VTW does not support microbatching (--enable-dbo / ubatch_size) yet")
    if parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1:
        raise ValueError("VTW does not support decode/prefill context parallelism yet")


def _choose_attention_backend(attention_config, dtype) -> None:
    """On CUDA, an unset backend becomes FLASH_ATTN for 16-bit models and TRITON_ATTN
    otherwise (FlashAttention has no fp32; vLLM itself might pick FlashInfer); an explicit
    one outside :data:`SUPPORTED_ATTENTION_BACKENDS` is refused."""
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = attention_config.backend
    if backend is not None and backend.name not in SUPPORTED_ATTENTION_BACKENDS:
        raise ValueError(
            f"VTW supports the attention backends {list(SUPPORTED_ATTENTION_BACKENDS)}, "
            f"got {backend.name}: FlashInfer-style backends split a batch into decodes and "
            f"prefills by query length, which a compacted KV group breaks"
        )
    if backend is None and current_platform.is_cuda():
        name = "FLASH_ATTN" if dtype in (torch.float16, torch.bfloat16) else "TRITON_ATTN"
        logger.info(
            "VTW: attention backend %s (compacted KV groups need one of %s)",
            name,
            list(SUPPORTED_ATTENTION_BACKENDS),
        )
        attention_config.backend = AttentionBackendEnum[name]


def _use_piecewise_cuda_graphs(compilation_config) -> None:
    """FULL CUDA graph modes become PIECEWISE; unset becomes PIECEWISE (vLLM's default
    would be FULL_AND_PIECEWISE). No effect where the platform has no CUDA graphs."""
    mode = compilation_config.cudagraph_mode
    if mode is None:
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode.has_full_cudagraphs():
        logger.warning(
            "VTW: cudagraph_mode %s replays attention metadata from captured buffers, which "
            "the compacted KV groups do not use; running PIECEWISE CUDA graphs instead",
            mode.name,
        )
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
