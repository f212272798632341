"""Every place vtw_vllm reaches into vLLM internals. Keep this module the index of them.

Patches (the only code here that changes vLLM's objects):

1. ``MODELS_CONFIG_MAP`` (``vllm/model_executor/models/config.py``) is vLLM's table of
   per-architecture config hooks, consulted by ``VllmConfig.try_verify_and_update_config``
   before the platform settles scheduler, worker, compilation and async scheduling.
   There is no public API to add to it, so we insert our architectures' hook.
2. ``CPUWorker.init_device`` builds its model runner inline from the module-level name
   ``CPUModelRunner`` (CUDA's ``Worker`` has the ``_make_model_runner`` hook instead);
   we rebind that name while our worker's ``init_device`` runs.
3. ``InputProcessor.process_inputs`` validates a request AFTER the renderer has put its
   images in the front end's multimodal processor cache; a request rejected there (a bad
   ``vtw_k``, a prompt too long) never reaches the engine, so the front end would believe
   the engine holds images it never received, and the next request with those images
   would fail. :func:`forget_rejected_request_images` drops them from the front-end
   cache when ``process_inputs`` raises (vLLM's own recovery path, ``invalidate``).

Other reaches, each guarded in ``tests/test_vllm_patches.py``:

- private runner methods wrapped by :class:`~vtw_vllm.runner.VTWModelRunnerMixin`
  (``_prepare_inputs``, ``_get_slot_mappings``, ``_model_forward``,
  ``_determine_batch_execution_and_padding``, ``initialize_attn_backend``);
- ``__class__`` swaps: vLLM's ``Attention`` layers become
  :class:`~vtw_vllm.models.llava_vtw.VTWAttention`, the VTW groups' ``AttentionGroup``
  objects :class:`~vtw_vllm.runner.VTWAttentionGroup`;
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
            return original(self, request_id, prompt, *args, **kwargs)
        except Exception:
            cache = getattr(self.renderer, "mm_processor_cache", None)
            if cache is not None:
                for mm_hash in _rendered_mm_hashes(prompt):
                    cache.invalidate(mm_hash)
            raise

    process_inputs._vtw_wrapped = True
    InputProcessor.process_inputs = process_inputs
