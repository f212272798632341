"""The scheduler hook: tells the VTW KV managers how many tokens each layer group keeps.

vLLM's KV managers see only request ids and token counts; withdrawal depends on the
request's image placeholder ranges and its K. This scheduler owns that lookup and binds
itself into every :class:`~vtw_vllm.kv_cache.VTWManager` as their
:class:`~vtw_vllm.kv_cache.KeptTokenCounter`. Selected automatically for the VTW
architectures by the model config hook (``--scheduler-cls``).
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vtw_vllm.config import VTWConfig
from vtw_vllm.kv_cache import VTWManager
from vtw_vllm.vision_ranges import Ranges, kept_tokens, vision_ranges


class VTWScheduler(Scheduler):
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
            extra_args = request.sampling_params.extra_args if request.sampling_params else None
            info = (self.vtw_config.resolve_k(extra_args), vision_ranges(request.mm_features))
            self._vtw_requests[request_id] = info
        return info

    def kept(self, request_id: str, num_tokens: int, first_layer: int) -> int:
        k, ranges = self.vtw_request_info(request_id)
        return num_tokens if first_layer < k else kept_tokens(ranges, num_tokens)

    def _free_blocks(self, request: Request) -> None:
        super()._free_blocks(request)
        self._vtw_requests.pop(request.request_id, None)
