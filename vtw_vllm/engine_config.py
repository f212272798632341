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
- pipeline parallelism and speculative decoding are refused.
"""

from __future__ import annotations

import logging
import os

from vllm.config.compilation import CUDAGraphMode
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vtw_vllm import validation
from vtw_vllm.config import VTWConfig

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
        if validation.QUALNAME not in (model_config.logits_processors or []):
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
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("VTW does not support pipeline parallelism yet")
        if vllm_config.speculative_config is not None:
            raise ValueError("VTW does not support speculative decoding yet")

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
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


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
