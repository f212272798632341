"""Model-runner side of VTW: compacted attention metadata and slot mappings per KV group.

vLLM builds every KV group's slot mapping from the token positions and every group's
attention metadata from one batch-wide ``CommonAttentionMetadata``. A VTW group whose
layers no longer see some requests' vision tokens indexes a COMPACTED sequence instead.
This mixin, over vLLM's own ``GPUModelRunner`` (and so ``CPUModelRunner`` too), computes
a :class:`~vtw_vllm.step_plan.StepPlan` once per step and

- rewrites those groups' slot mappings from compacted logical positions (vLLM's own
  ``BlockTable.compute_slot_mapping``) and gives the KV writes the compacted slice;
- swaps in compacted query_start_loc / seq_lens / token counts when the groups'
  attention metadata is built (:class:`VTWAttentionGroup`), so stock backends work;
- hands the model the rows to withdraw, through the forward context.
Steps with nothing to withdraw, and dummy/profiling runs, take the stock path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.v1.worker.utils import AttentionGroup

from vtw_vllm.config import VTWConfig
from vtw_vllm.step_plan import StepPlan, plan_step
from vtw_vllm.vision_ranges import Ranges, vision_ranges

FORWARD_CONTEXT_KEY = "vtw_plan"


@dataclass(frozen=True)
class ModelPlan:
    """What the model forward needs, on the device."""

    num_tokens: int
    withdrawals: list[tuple[int, torch.Tensor]]  # (layer K, keep index into current rows)
    out_index: torch.Tensor  # original rows of the rows leaving the last layer


class VTWAttentionGroup(AttentionGroup):
    """An attention group that builds its metadata from this step's compacted view."""

    vtw_fields: dict[str, Any] | None = None

    def build_metadata(self, common_attn_metadata, ubatch_idx=0, common_prefix_len=0, **kw):
        if self.vtw_fields is not None:
            common_attn_metadata = common_attn_metadata.replace(**self.vtw_fields)
            common_prefix_len = 0  # cascade attention's shared prefix is not compacted
        return super().build_metadata(common_attn_metadata, ubatch_idx, common_prefix_len, **kw)


class VTWModelRunnerMixin:
    """Mix in before ``GPUModelRunner`` / ``CPUModelRunner``."""

    _vtw_plan: StepPlan | None = None

    def initialize_attn_backend(self, *args, **kwargs) -> None:
        super().initialize_attn_backend(*args, **kwargs)
        self.vtw_config = VTWConfig.from_hf_config(self.model_config.hf_config)
        self._vtw_requests: dict[str, tuple[int, Ranges]] = {}
        # KV group id -> first decoder layer of the group (every VTW layer reports one).
        self._vtw_group_start = {
            gid: group.kv_cache_spec.first_layer
            for gid, group in enumerate(self.kv_cache_config.kv_cache_groups)
            if hasattr(group.kv_cache_spec, "first_layer")
        }
        for gid in self._vtw_group_start:
            for attn_group in self.attn_groups[gid]:
                attn_group.__class__ = VTWAttentionGroup

    # -- per step ----------------------------------------------------------------------

    def _vtw_request_info(self, req_id: str) -> tuple[int, Ranges]:
        info = self._vtw_requests.get(req_id)
        if info is None:
            state = self.requests[req_id]
            extra_args = state.sampling_params.extra_args if state.sampling_params else None
            info = (self.vtw_config.resolve_k(extra_args), vision_ranges(state.mm_features))
            self._vtw_requests[req_id] = info
        return info

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray, *a, **kw):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *a, **kw)
        for req_id in scheduler_output.finished_req_ids:
            self._vtw_requests.pop(req_id, None)
        num_reqs = self.input_batch.num_reqs
        infos = [self._vtw_request_info(r) for r in self.input_batch.req_ids[:num_reqs]]
        plan = plan_step(
            num_scheduled_tokens[:num_reqs],
            self.input_batch.num_computed_tokens_cpu[:num_reqs],
            np.array([k for k, _ in infos], dtype=np.int64),
            [ranges for _, ranges in infos],
            sorted(set(self._vtw_group_start.values())),
        )
        self._vtw_plan = plan
        if plan is not None:
            self._vtw_apply_group_layouts(plan, num_reqs)
        return out

    def _vtw_apply_group_layouts(self, plan: StepPlan, num_reqs: int) -> None:
        """Compacted slot mappings and metadata fields for every compacted group."""
        device_cache: dict[int, dict[str, Any]] = {}  # layouts are shared between groups
        for gid, start in self._vtw_group_start.items():
            layout = plan.groups.get(start)
            fields = None
            if layout is not None:
                fields = device_cache.get(id(layout))
                if fields is None:
                    qsl_cpu = torch.from_numpy(layout.query_start_loc)
                    seq_lens_cpu = torch.from_numpy(layout.seq_lens)
                    fields = dict(
                        query_start_loc=qsl_cpu.to(self.device, non_blocking=True),
                        query_start_loc_cpu=qsl_cpu,
                        seq_lens=seq_lens_cpu.to(self.device, non_blocking=True),
                        seq_lens_cpu_upper_bound=seq_lens_cpu,
                        num_actual_tokens=layout.num_tokens,
                        max_query_len=int(np.diff(layout.query_start_loc).max(initial=0)),
                        max_seq_len=int(layout.seq_lens.max(initial=0)),
                        positions=torch.from_numpy(layout.positions).to(self.device),
                        dcp_local_seq_lens=None,
                    )
                    device_cache[id(layout)] = fields
                block_table = self.input_batch.block_table[gid]
                block_table.compute_slot_mapping(
                    num_reqs,
                    fields["query_start_loc"],
                    torch.from_numpy(layout.logical_positions).to(self.device),
                )
                fields = {
                    **fields,
                    "slot_mapping": block_table.slot_mapping.gpu[: layout.num_tokens],
                }
            for attn_group in self.attn_groups[gid]:
                attn_group.vtw_fields = fields

    def _get_slot_mappings(self, *args, **kwargs):
        by_gid, by_layer = super()._get_slot_mappings(*args, **kwargs)
        plan = self._vtw_plan
        if plan is None or by_gid is None:
            return by_gid, by_layer
        for gid, start in self._vtw_group_start.items():
            layout = plan.groups.get(start)
            if layout is None:
                continue
            slot_mapping = self.input_batch.block_table[gid].slot_mapping.gpu[: layout.num_tokens]
            by_gid[gid] = slot_mapping
            for name in self.kv_cache_config.kv_cache_groups[gid].layer_names:
                by_layer[name] = slot_mapping
        return by_gid, by_layer

    def _model_forward(self, *args, **kwargs):
        plan = self._vtw_plan
        if plan is not None and plan.withdrawals:
            get_forward_context().additional_kwargs[FORWARD_CONTEXT_KEY] = ModelPlan(
                num_tokens=plan.num_tokens,
                withdrawals=[
                    (w.layer, torch.from_numpy(w.keep_index).to(self.device))
                    for w in plan.withdrawals
                ],
                out_index=torch.from_numpy(plan.out_index).to(self.device),
            )
        return super()._model_forward(*args, **kwargs)

    def execute_model(self, *args, **kwargs):
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            self._vtw_plan = None
            for gid in self._vtw_group_start:
                for attn_group in self.attn_groups[gid]:
                    attn_group.vtw_fields = None
