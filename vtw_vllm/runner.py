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
- hands the model the rows to withdraw, through the forward context, and dispatches a
  step that withdraws rows without CUDA graphs (its row count changes mid-model).

Host work per step: each request's (K, vision ranges) is resolved once per request and
the batch's arrays are rebuilt only when the batch's requests change; the plan's index
arrays go to the device through vLLM's pinned ``CpuGpuBuffer`` copies, non-blocking,
inside the runner's input-preparation window. Steps with nothing to withdraw and no
compacted group (e.g. K = N), and dummy/profiling runs, take the stock path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.v1.worker.utils import AttentionGroup

from vtw_vllm.config import VTWConfig
from vtw_vllm.engine_config import SUPPORTED_ATTENTION_BACKENDS
from vtw_vllm.resumed_mm_inputs import restore_resumed_mm_features
from vtw_vllm.step_plan import (
    FORWARD_CONTEXT_KEY,
    BatchVision,
    GroupLayout,
    ModelPlan,
    StepPlan,
    plan_step,
)
from vtw_vllm.vision_ranges import RequestVision, request_vtw_info


class VTWAttentionGroup(AttentionGroup):
    """An attention group that builds its metadata from this step's compacted view."""

    vtw_fields: dict[str, Any] | None = None

    def build_metadata(self, common_attn_metadata, ubatch_idx=0, common_prefix_len=0, **kw):
        if self.vtw_fields is not None and self.vtw_fields["num_actual_tokens"] == 0:
            # Every row of the step left before this group's layers, which do not run
            # (the model stops at an empty batch): no metadata for zero tokens.
            return None
        if self.vtw_fields is not None:
            common_attn_metadata = common_attn_metadata.replace(**self.vtw_fields)
            common_prefix_len = 0  # cascade attention's shared prefix is not compacted
        return super().build_metadata(common_attn_metadata, ubatch_idx, common_prefix_len, **kw)


class VTWModelRunnerMixin:
    """Mix in before ``GPUModelRunner`` / ``CPUModelRunner``."""

    _vtw_plan: StepPlan | None = None
    _vtw_model_plan: ModelPlan | None = None

    def initialize_attn_backend(self, *args, **kwargs) -> None:
        super().initialize_attn_backend(*args, **kwargs)
        self.vtw_config = VTWConfig.from_hf_config(self.model_config.hf_config)
        self._vtw_requests: dict[str, RequestVision] = {}
        self._vtw_batch_key: tuple[str, ...] | None = None
        self._vtw_batch = BatchVision.of([])
        # KV group id -> first decoder layer of the group (every VTW layer reports one).
        self._vtw_group_start = {
            gid: group.kv_cache_spec.first_layer
            for gid, group in enumerate(self.kv_cache_config.kv_cache_groups)
            if hasattr(group.kv_cache_spec, "first_layer")
        }
        self._vtw_starts = sorted(set(self._vtw_group_start.values()))
        for gid in self._vtw_group_start:
            for attn_group in self.attn_groups[gid]:
                name = attn_group.backend.get_name()
                if name not in SUPPORTED_ATTENTION_BACKENDS:
                    raise RuntimeError(
                        f"VTW KV groups need one of the attention backends "
                        f"{list(SUPPORTED_ATTENTION_BACKENDS)}, this engine chose {name}; "
                        f"start it with --attention-backend FLASH_ATTN"
                    )
                attn_group.__class__ = VTWAttentionGroup
        self._vtw_make_buffers()
        self._vtw_warm_kernel()

    def _vtw_make_buffers(self) -> None:
        """Pinned host / device buffers for every array a step plan sends to the device."""
        n, r = self.max_num_tokens, self.max_num_reqs
        make = self._make_buffer
        self._vtw_layout_bufs = {
            s: {
                "query_start_loc": make(r + 1, dtype=torch.int32),
                "seq_lens": make(r, dtype=torch.int32),
                "positions": make(n, dtype=torch.int64),
                "logical_positions": make(n, dtype=torch.int64),
            }
            for s in self._vtw_starts
        }
        self._vtw_keep_bufs = {s: make(n, dtype=torch.int64) for s in self._vtw_starts}
        self._vtw_out_buf = make(n, dtype=torch.int64)
        if self.device.type == "cpu":  # as CPUModelRunner does with its own buffers
            for buf in [*self._vtw_keep_bufs.values(), self._vtw_out_buf]:
                buf.gpu = buf.cpu
            for bufs in self._vtw_layout_bufs.values():
                for buf in bufs.values():
                    buf.gpu = buf.cpu

    def _vtw_warm_kernel(self) -> None:
        """Compile the Triton row gather for this model's width and dtype now, not in the
        first request that withdraws rows (CUDA only; CPU uses the PyTorch reference)."""
        if self.device.type != "cuda":
            return
        from vtw_vllm.kernels.gather_rows import gather_rows_auto

        hidden_size = self.model_config.get_hidden_size()
        hidden = torch.zeros((2, hidden_size), dtype=self.dtype, device=self.device)
        positions = torch.zeros(2, dtype=torch.int64, device=self.device)
        index = torch.zeros(1, dtype=torch.int64, device=self.device)
        gather_rows_auto(hidden, None, positions, index)  # first layer: no residual
        gather_rows_auto(hidden, hidden, positions, index)

    # -- per step ----------------------------------------------------------------------

    def _vtw_batch_vision(self, num_reqs: int) -> BatchVision:
        """The persistent batch's K and vision arrays, rebuilt only when its requests (or
        their order) change."""
        key = tuple(self.input_batch.req_ids[:num_reqs])
        if key != self._vtw_batch_key:
            infos = []
            for req_id in key:
                info = self._vtw_requests.get(req_id)
                if info is None:
                    state = self.requests[req_id]
                    info = request_vtw_info(
                        self.vtw_config, state.sampling_params, state.mm_features
                    )
                    self._vtw_requests[req_id] = info
                infos.append(info)
            self._vtw_batch = BatchVision.of(infos)
            self._vtw_batch_key = key
        return self._vtw_batch

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray, *a, **kw):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *a, **kw)
        for req_id in scheduler_output.finished_req_ids:
            self._vtw_requests.pop(req_id, None)
        num_reqs = self.input_batch.num_reqs
        plan = plan_step(
            num_scheduled_tokens[:num_reqs],
            self.input_batch.num_computed_tokens_cpu[:num_reqs],
            self._vtw_batch_vision(num_reqs),
            self._vtw_starts,
        )
        self._vtw_plan = plan
        if plan is not None:
            self._vtw_apply_group_layouts(plan, num_reqs)
            if plan.withdrawals:
                self._vtw_model_plan = self._vtw_to_device(plan)
        return out

    def _vtw_to_device(self, plan: StepPlan) -> ModelPlan:
        withdrawals = []
        for w in plan.withdrawals:
            buf = self._vtw_keep_bufs[w.layer]
            buf.np[: len(w.keep_index)] = w.keep_index
            withdrawals.append((w.layer, buf.copy_to_gpu(len(w.keep_index))))
        self._vtw_out_buf.np[: len(plan.out_index)] = plan.out_index
        return ModelPlan(
            withdrawals=withdrawals, out_index=self._vtw_out_buf.copy_to_gpu(len(plan.out_index))
        )

    def _vtw_layout_fields(self, layout: GroupLayout, start: int) -> dict[str, Any]:
        """A group layout's metadata fields, through the buffers of group ``start``."""
        bufs = self._vtw_layout_bufs[start]
        num_reqs, num_tokens = len(layout.seq_lens), layout.num_tokens
        for name, n in (
            ("query_start_loc", num_reqs + 1),
            ("seq_lens", num_reqs),
            ("positions", num_tokens),
            ("logical_positions", num_tokens),
        ):
            bufs[name].np[:n] = getattr(layout, name)
            bufs[name].copy_to_gpu(n)
        return dict(
            query_start_loc=bufs["query_start_loc"].gpu[: num_reqs + 1],
            query_start_loc_cpu=bufs["query_start_loc"].cpu[: num_reqs + 1],
            seq_lens=bufs["seq_lens"].gpu[:num_reqs],
            seq_lens_cpu_upper_bound=bufs["seq_lens"].cpu[:num_reqs],
            num_actual_tokens=num_tokens,
            max_query_len=int(np.diff(layout.query_start_loc).max(initial=0)),
            max_seq_len=int(layout.seq_lens.max(initial=0)),
            positions=bufs["positions"].gpu[:num_tokens],
            dcp_local_seq_lens=None,
        )

    def _vtw_apply_group_layouts(self, plan: StepPlan, num_reqs: int) -> None:
        """Compacted slot mappings and metadata fields for every compacted group."""
        by_layout: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}  # shared layouts
        for gid, start in self._vtw_group_start.items():
            layout = plan.groups.get(start)
            fields = None
            if layout is not None:
                if id(layout) not in by_layout:
                    fields = self._vtw_layout_fields(layout, start)
                    logical = self._vtw_layout_bufs[start]["logical_positions"]
                    by_layout[id(layout)] = (fields, logical.gpu[: layout.num_tokens])
                fields, logical_positions = by_layout[id(layout)]
                block_table = self.input_batch.block_table[gid]
                block_table.compute_slot_mapping(
                    num_reqs, fields["query_start_loc"], logical_positions
                )
                fields = {
                    **fields,
                    "slot_mapping": block_table.slot_mapping.gpu[: layout.num_tokens],
                }
            for attn_group in self.attn_groups[gid]:
                attn_group.vtw_fields = fields

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        if self._vtw_plan is not None and self._vtw_plan.withdrawals:
            kwargs["force_eager"] = True  # the row count changes inside the model
        return super()._determine_batch_execution_and_padding(*args, **kwargs)

    def _get_slot_mappings(self, *args, **kwargs):
        by_gid, by_layer = super()._get_slot_mappings(*args, **kwargs)
        plan = self._vtw_plan
        # Without a withdrawal, vLLM's slice of each group's slot-mapping buffer (padded
        # with -1 for CUDA graphs) already holds the compacted mapping written above.
        if plan is None or not plan.withdrawals or by_gid is None:
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

    def _update_states(self, scheduler_output):
        result = super()._update_states(scheduler_output)
        restore_resumed_mm_features(scheduler_output, self.requests)  # see that module
        return result

    def _model_forward(self, *args, **kwargs):
        if self._vtw_model_plan is not None:
            get_forward_context().additional_kwargs[FORWARD_CONTEXT_KEY] = self._vtw_model_plan
        return super()._model_forward(*args, **kwargs)

    def execute_model(self, *args, **kwargs):
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            self._vtw_plan = None
            self._vtw_model_plan = None
            for gid in self._vtw_group_start:
                for attn_group in self.attn_groups[gid]:
                    attn_group.vtw_fields = None
