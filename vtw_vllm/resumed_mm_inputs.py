"""Give a resumed request back the image/video data the worker was never sent.

vLLM 0.32's scheduler strips the tensor data of every multimodal item that a new
request's prefix-cache hit already covers (``strip_covered_mm_data``): the worker can
never need it. That stops being true when the request is later preempted and its cached
blocks are evicted before it resumes: it restarts below the item, the scheduler runs the
item's encoder again, and vLLM's V1 model runner (the one VTW extends) finds no data in
its copy of the request, skips the encoder and then stops the engine with "Encoder cache
miss". (vLLM's V2 runner resends a resumed request whole, so stock on CUDA is not hit.)
Seen in the 500-request soak; ``tests/test_kv_accounting.py`` reproduces it exactly.

The scheduler side attaches, for each resumed request that has encoder work this step,
the request's full features to the step's ``SchedulerOutput``; the runner side puts them
into its copy of the request before the encoder runs. Nothing is sent in any other step.
"""

from __future__ import annotations

from typing import Any

ATTRIBUTE = "vtw_resumed_mm_features"


def attach_resumed_mm_features(scheduler_output: Any, requests: dict[str, Any]) -> None:
    """Scheduler side: add the full features of resumed requests with encoder work."""
    resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
    features = {
        req_id: list(requests[req_id].mm_features)
        for req_id in scheduler_output.scheduled_encoder_inputs
        if req_id in resumed
    }
    if features:
        setattr(scheduler_output, ATTRIBUTE, features)


def restore_resumed_mm_features(scheduler_output: Any, worker_requests: dict[str, Any]) -> None:
    """Runner side: replace the worker's (possibly stripped) features of those requests."""
    for req_id, features in getattr(scheduler_output, ATTRIBUTE, {}).items():
        worker_requests[req_id].mm_features = features
