"""The scheduler hook: tells the VTW KV managers how many tokens each layer group keeps.

vLLM's KV managers see only request ids and token counts; withdrawal depends on the
request's image placeholder ranges and its K. This scheduler owns that lookup and binds
itself into every :class:`~vtw_vllm.kv_cache.VTWManager` as their
:class:`~vtw_vllm.kv_cache.KeptTokenCounter`.

vLLM decides async scheduling after the model config hook has run, so the hook names
:func:`make_vtw_scheduler` (``--scheduler-cls``), which builds the VTW twin of the
scheduler vLLM itself would use: :class:`VTWAsyncScheduler` over vLLM's
``AsyncScheduler`` when async scheduling is on (vLLM's default on CUDA), else
:class:`VTWScheduler`. The VTW part is the same mixin in both.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vtw_vllm.config import VTWConfig
from vtw_vllm.kv_cache import VTWManager
from vtw_vllm.vision_ranges import Ranges, kept_tokens, request_vtw_info


class VTWSchedulerMixin:
    """Mix in before vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vtw_config = VTWConfig.from_hf_config(self.vllm_config.model_config.hf_config)
        self._vtw_requests: dict[str, tuple[int, Ranges]] = {}
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, VTWManager):
                manager.counter = self

    def vtw_request_info(self, request_id: str) -> tuple[int, Ranges]:
        """(K, vision ranges) of a request, computed once."""
        info = self._vtw_requests.get(request_id)
        if info is None:
            request = self.requests[request_id]
            info = request_vtw_info(self.vtw_config, request.sampling_params, request.mm_features)
            self._vtw_requests[request_id] = info
        return info

    def kept(self, request_id: str, num_tokens: int, first_layer: int) -> int:
        k, ranges = self.vtw_request_info(request_id)
        return num_tokens if first_layer < k else kept_tokens(ranges, num_tokens)

    def _free_blocks(self, request: Request) -> None:
        super()._free_blocks(request)
        self._vtw_requests.pop(request.request_id, None)


class VTWScheduler(VTWSchedulerMixin, Scheduler):
    pass


class VTWAsyncScheduler(VTWSchedulerMixin, AsyncScheduler):
    pass


def make_vtw_scheduler(*, vllm_config, **kwargs) -> Scheduler:
    """Build the VTW scheduler matching the engine's async-scheduling decision."""
    cls = VTWAsyncScheduler if vllm_config.scheduler_config.async_scheduling else VTWScheduler
    return cls(vllm_config=vllm_config, **kwargs)
