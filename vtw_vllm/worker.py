"""Worker classes that build the VTW model runner (``--worker-cls vtw_vllm.worker.VTWWorker``).

Set automatically for the VTW architectures by the model config hook. On CUDA the
worker's documented ``_make_model_runner`` hook is used; vLLM's ``CPUWorker`` builds its
runner inline, so its module-level runner name is swapped for the duration of
``init_device`` (see :mod:`vtw_vllm.vllm_patches`).
"""

from __future__ import annotations

from vllm.platforms import current_platform

from vtw_vllm.runner import VTWModelRunnerMixin

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    from vtw_vllm.vllm_patches import cpu_worker_runner_class

    class VTWCPUModelRunner(VTWModelRunnerMixin, CPUModelRunner):
        pass

    class VTWWorker(CPUWorker):
        def init_device(self) -> None:
            with cpu_worker_runner_class(VTWCPUModelRunner):
                super().init_device()

else:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class VTWGPUModelRunner(VTWModelRunnerMixin, GPUModelRunner):
        pass

    class VTWWorker(Worker):
        def _make_model_runner(self):
            if self.vllm_config.use_v2_model_runner:
                raise RuntimeError(
                    "VTW extends vLLM's V1 model runner, but this engine's config selects "
                    "the V2 runner (VLLM_USE_V2_MODEL_RUNNER was read before the VTW config "
                    "hook set it to 0); start the engine with VLLM_USE_V2_MODEL_RUNNER=0"
                )
            return VTWGPUModelRunner(self.vllm_config, self.device)
