"""The only places vtw_vllm reaches into vLLM internals. Keep this module small.

1. ``MODELS_CONFIG_MAP`` (``vllm/model_executor/models/config.py``) is vLLM's table of
   per-architecture config hooks, consulted by ``VllmConfig.try_verify_and_update_config``
   before the platform settles scheduler, worker, eager mode and async scheduling.
   There is no public API to add to it, so we insert our architectures' hook.
2. ``CPUWorker.init_device`` builds its model runner inline from the module-level name
   ``CPUModelRunner`` (CUDA's ``Worker`` has the ``_make_model_runner`` hook instead);
   we rebind that name while our worker's ``init_device`` runs.

``tests/test_vllm_patches.py`` fails loudly when either changes underneath us.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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
