"""The scheduler hook: tells the VTW KV managers how many tokens each layer group keeps.

vLLM's KV managers see only request ids and token counts; withdrawal depends on the
request's image placeholder ranges and its K. This scheduler owns that lookup and binds
itself into every :class:`~vtw_vllm.kv_cache.VTWManager` as their
:class:`~vtw_vllm.kv_cache.VTWRequestInfo`; it also does the prefix-cache lookup
across the layer groups (see :mod:`vtw_vllm.kv_cache`).

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
from vtw_vllm.resumed_mm_inputs import attach_resumed_mm_features
from vtw_vllm.vision_ranges import RequestVision, request_vtw_info


class VTWSchedulerMixin:
    """Mix in before vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vtw_config = VTWConfig.from_hf_config(self.vllm_config.model_config.hf_config)
        self._vtw_requests: dict[str, RequestVision] = {}
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, VTWManager):
                manager.counter = self

    def vtw_request_info(self, request_id: str) -> RequestVision:
        """K and vision ranges of a request, computed once."""
        info = self._vtw_requests.get(request_id)
        if info is None:
            request = self.requests[request_id]
            info = request_vtw_info(self.vtw_config, request.sampling_params, request.mm_features)
            self._vtw_requests[request_id] = info
        return info

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        attach_resumed_mm_features(output, self.requests)  # a vLLM 0.32 fix, see there
        return output

    def _vtw_managers(self) -> list[VTWManager]:
        return self.kv_cache_manager.coordinator.single_type_managers

    def _get_local_prefix_cache_hit(self, request: Request):
        """The longest prefix every KV group can serve, for this request's K and images.

        vLLM's coordinator assumes block i of every full-attention group covers tokens
        [iB, (i+1)B); compacted groups break that, so each group reports its own longest
        hit (every shorter block-aligned hit is a trim of it), and the shortest wins.
        """
        kv = self.kv_cache_manager
        if self.connector is not None or not kv.prefix_cache_lookup_enabled(request):
            return super()._get_local_prefix_cache_hit(request)
        size = kv.coordinator.scheduler_block_size
        length = (request.num_tokens - 1) // size * size  # the last token is recomputed
        found = []
        for manager in self._vtw_managers():
            blocks, hit = manager.vtw_longest_hit(request, length) if length else ([], 0)
            found.append(blocks)
            length = min(length, hit)
        if length == 0:
            return kv.empty_kv_cache_blocks, 0, 0, False
        blocks = tuple(
            manager.vtw_trim(request.request_id, group_blocks, length)
            for manager, group_blocks in zip(self._vtw_managers(), found, strict=True)
        )
        return kv.create_kv_cache_blocks(blocks), length, 0, False

    def _free_request_blocks(self, request: Request) -> None:
        # Compacted groups register keys one step late; their last step's are added here.
        if self.kv_cache_manager.enable_caching:
            for manager in self._vtw_managers():
                manager.cache_computed_blocks(request)
        super()._free_request_blocks(request)

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
