"""Every place vtw_vllm reaches into vLLM internals. Keep this module the index of them.

Patches (the only code here that changes vLLM's objects):

1. ``MODELS_CONFIG_MAP`` (``vllm/model_executor/models/config.py``) is vLLM's table of
   per-architecture config hooks, consulted by ``VllmConfig.try_verify_and_update_config``
   before the platform settles scheduler, worker, compilation and async scheduling.
   There is no public API to add to it, so we insert our architectures' hook.
2. ``CPUWorker.init_device`` builds its model runner inline from the module-level name
   ``CPUModelRunner`` (CUDA's ``Worker`` has the ``_make_model_runner`` hook instead);
   we rebind that name while our worker's ``init_device`` runs.
3. ``InputProcessor.process_inputs`` turns a rendered prompt into the engine's request
   in the front end. :func:`forget_rejected_request_images` wraps it to run
   :func:`vtw_vllm.validation.validate_request` on the result (it needs the rendered
   prompt), and, when the request is rejected (there or earlier: a bad ``vtw_k``, a
   prompt too long), to drop its images from the front end's multimodal processor cache
   (vLLM's own recovery path, ``invalidate``): they were cached when rendered but never
   reach the engine, so the next request with those images would otherwise fail.

4. ``vllm.envs`` caches environment variables once a service has started
   (``enable_envs_cache``); :func:`use_v1_model_runner` sets
   ``VLLM_USE_V2_MODEL_RUNNER=0`` and clears that cache so the V1 runner, which VTW
   extends, is what the config reports even for a second engine in one process.

5. ``EngineCore.preprocess_add_request`` is where the engine process turns a client's
   request into a scheduler ``Request``; an exception there fails that request alone
   (the client gets an error output, the engine goes on), while one raised later in
   ``schedule()`` would stop the engine. :func:`validate_vtw_k_in_engine_core` runs
   :func:`vtw_vllm.validation.validate_request` there too, for requests that reach the
   engine without the front end's validation (a second API server, a direct client).

Other reaches, each guarded in ``tests/test_vllm_patches.py``:

- private runner methods wrapped by :class:`~vtw_vllm.runner.VTWModelRunnerMixin`
  (``_prepare_inputs``, ``_get_slot_mappings``, ``_model_forward``,
  ``_determine_batch_execution_and_padding``, ``initialize_attn_backend``);
- ``__class__`` swaps: vLLM's ``Attention`` layers become
  :class:`~vtw_vllm.models.llava_vtw.VTWAttention`, the VTW groups' ``AttentionGroup``
  objects :class:`~vtw_vllm.runner.VTWAttentionGroup`;
- ``Scheduler.schedule`` and the runner's ``_update_states`` carry a resumed request's
  multimodal data to the worker (:mod:`vtw_vllm.resumed_mm_inputs`, a vLLM 0.32 fix);
- ``Scheduler._free_blocks`` (the scheduler forgets a request's VTW info there) and the
  KV manager methods :class:`~vtw_vllm.kv_cache.VTWManager` translates.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


def add_model_config_hook(architecture: str, hook: type) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[architecture] = hook


@contextlib.contextmanager
def cpu_worker_runner_class(runner_cls: type) -> Iterator[None]:
    import vllm.v1.worker.cpu_worker as cpu_worker

    original = cpu_worker.CPUModelRunner
    cpu_worker.CPUModelRunner = runner_cls
    try:
        yield
    finally:
        cpu_worker.CPUModelRunner = original


def _vtw_config_of(owner: Any, hf_config: Any):
    """The VTWConfig of a VTW model (None otherwise), resolved once per ``owner``."""
    vtw = owner.__dict__.get("_vtw_config", False)
    if vtw is False:
        from vtw_vllm import ARCHITECTURES
        from vtw_vllm.config import VTWConfig

        is_vtw = set(getattr(hf_config, "architectures", None) or ()) & set(ARCHITECTURES)
        vtw = VTWConfig.from_hf_config(hf_config) if is_vtw else None
        owner._vtw_config = vtw
    return vtw


def _rendered_mm_hashes(prompt: Any) -> list[str]:
    """The multimodal hashes of a rendered prompt (an EngineInput dict), if any."""
    inputs = [prompt]
    if isinstance(prompt, dict):
        inputs += [prompt.get("encoder_prompt"), prompt.get("decoder_prompt")]
    hashes: list[str] = []
    for item in inputs:
        if isinstance(item, dict) and isinstance(item.get("mm_hashes"), dict):
            for values in item["mm_hashes"].values():
                hashes += [h for h in values if isinstance(h, str)]
    return hashes


def forget_rejected_request_images() -> None:
    """Wrap ``InputProcessor.process_inputs`` once (idempotent, every process)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_vtw_wrapped", False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, *args, **kwargs):
        try:
            request = original(self, request_id, prompt, *args, **kwargs)
            vtw = _vtw_config_of(self, self.model_config.hf_config)
            if vtw is not None:
                from vtw_vllm.validation import validate_request

                num_prompt_tokens = len(request.prompt_token_ids or ())
                if request.prompt_embeds is not None:
                    num_prompt_tokens = len(request.prompt_embeds)
                validate_request(
                    vtw, request.sampling_params, num_prompt_tokens, request.mm_features
                )
            return request
        except Exception:
            cache = getattr(self.renderer, "mm_processor_cache", None)
            if cache is not None:
                for mm_hash in _rendered_mm_hashes(prompt):
                    cache.invalidate(mm_hash)
            raise

    process_inputs._vtw_wrapped = True
    InputProcessor.process_inputs = process_inputs


def use_v1_model_runner() -> None:
    """Make ``VllmConfig.use_v2_model_runner`` read False from now on (VTW's runner mixin
    extends the V1 ``GPUModelRunner``)."""
    import os

    import vllm.envs as envs

    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if envs._is_envs_cache_enabled():
        envs.__getattr__.cache_clear()


def validate_vtw_k_in_engine_core() -> None:
    """Wrap ``EngineCore.preprocess_add_request`` once (idempotent, every process)."""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.preprocess_add_request
    if getattr(original, "_vtw_wrapped", False):
        return

    @functools.wraps(original)
    def preprocess_add_request(self, request):
        vtw = _vtw_config_of(self, self.vllm_config.model_config.hf_config)
        if vtw is not None and request.sampling_params is not None:
            from vtw_vllm.validation import validate_request

            num_prompt_tokens = len(request.prompt_token_ids or ())
            if request.prompt_embeds is not None:
                num_prompt_tokens = len(request.prompt_embeds)
            validate_request(vtw, request.sampling_params, num_prompt_tokens, request.mm_features)
        return original(self, request)

    preprocess_add_request._vtw_wrapped = True
    EngineCore.preprocess_add_request = preprocess_add_request
