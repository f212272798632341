"""Per-step withdrawal plan: which rows each layer sees, and the deep KV groups' layout.

Pure numpy on the host, computed once per engine step by the model runner from the
scheduled batch. It answers two questions for the flat token batch of one step:

1. Model: at which layers rows are withdrawn (one gather per distinct K present) and
   where the surviving rows go back for the logits (``out_index``).
2. KV: for every KV cache group starting at layer ``s``, the compacted view of the
   batch (query_start_loc, seq_lens, logical positions into its compacted block table)
   for requests whose K <= s. Other requests keep their full view in that group.

Example: two requests, A (K=4; 2 text + 3 vision + 1 text tokens) and B (no image,
2 tokens), group starts [0, 4]. Flat batch = A0 A1 Av Av Av A5 B0 B1. At layer 4 the
three Av rows leave; group 4 sees A0 A1 A5 B0 B1 with logical positions 0 1 2 0 1,
query_start_loc [0, 3, 5], seq_lens [3, 2].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vtw_vllm.vision_ranges import RequestVision, vision_tokens_below

# The model runner hands a step's ModelPlan to the model through this forward-context key.
FORWARD_CONTEXT_KEY = "vtw_plan"


@dataclass(frozen=True)
class ModelPlan:
    """What the model forward needs from a step's plan, on the device."""

    withdrawals: list[tuple[int, torch.Tensor]]  # (layer K, keep index into current rows)
    out_index: torch.Tensor  # original rows of the rows leaving the last layer


@dataclass(frozen=True)
class Withdrawal:
    layer: int  # the first layer that no longer sees these rows (a request's K)
    keep_index: np.ndarray  # int64, rows kept, relative to the rows alive before


@dataclass(frozen=True)
class GroupLayout:
    """The rows one KV cache group sees in this step, in compacted coordinates."""

    alive_index: np.ndarray  # int64 [M], rows of the flat batch this group sees
    logical_positions: np.ndarray  # int64 [M], index into each request's compacted KV
    positions: np.ndarray  # int64 [M], original positions (RoPE keeps them)
    query_start_loc: np.ndarray  # int32 [R + 1]
    seq_lens: np.ndarray  # int32 [R]

    @property
    def num_tokens(self) -> int:
        return len(self.alive_index)


@dataclass(frozen=True)
class BatchVision:
    """The persistent batch's requests as arrays, built when its requests change (not
    every step)."""

    requests: tuple[RequestVision, ...]
    k: np.ndarray  # int64 [R]
    total: np.ndarray  # int64 [R], vision tokens per request
    end: np.ndarray  # int64 [R], one past each request's last vision position
    has_vision: np.ndarray  # bool [R]

    @classmethod
    def of(cls, requests: Sequence[RequestVision]) -> BatchVision:
        total = np.array([r.total for r in requests], dtype=np.int64)
        return cls(
            requests=tuple(requests),
            k=np.array([r.k for r in requests], dtype=np.int64),
            total=total,
            end=np.array([r.end for r in requests], dtype=np.int64),
            has_vision=total > 0,
        )


@dataclass(frozen=True)
class StepPlan:
    num_tokens: int
    withdrawals: list[Withdrawal]
    out_index: np.ndarray  # int64, original rows of the deepest layer's rows
    groups: dict[int, GroupLayout]  # group first layer -> layout (only compacted groups)


def plan_step(
    num_scheduled: np.ndarray,
    num_computed: np.ndarray,
    batch: BatchVision,
    group_starts: Sequence[int],
) -> StepPlan | None:
    """Plan one step; None when no request in it withdraws anything (stock path)."""
    num_scheduled = np.asarray(num_scheduled, dtype=np.int64)
    num_computed = np.asarray(num_computed, dtype=np.int64)
    request_k, has_vision = batch.k, batch.has_vision
    if not np.any(has_vision & (request_k <= group_starts[-1])):
        return None
    if not np.any(has_vision & (num_computed < batch.end)):
        return _plan_past_vision(num_scheduled, num_computed, batch, group_starts)

    num_reqs = len(num_scheduled)
    ends = np.cumsum(num_scheduled)
    starts = ends - num_scheduled
    num_tokens = int(ends[-1]) if num_reqs else 0
    req_idx = np.repeat(np.arange(num_reqs), num_scheduled)
    pos = num_computed[req_idx] + np.arange(num_tokens) - starts[req_idx]

    # Decode steps (and late prefill chunks) schedule only tokens past the request's last
    # image: none is vision and all of the request's vision tokens lie before them. Those
    # requests are handled in bulk; only requests whose step reaches into an image loop.
    vision_count, last_end = batch.total, batch.end
    is_vision = np.zeros(num_tokens, dtype=bool)
    vision_before = vision_count[req_idx]  # vision positions < pos, same request
    vision_total = vision_count.copy()  # vision positions < seq_len
    for r in np.flatnonzero(has_vision & (num_computed < last_end)):
        vision_before[starts[r] : ends[r]] = 0
        p = pos[starts[r] : ends[r]]
        for a, b in batch.requests[r].ranges:
            is_vision[starts[r] : ends[r]] |= (p >= a) & (p < b)
            vision_before[starts[r] : ends[r]] += np.clip(p - a, 0, b - a)
        vision_total[r] = vision_tokens_below(
            batch.requests[r].ranges, num_computed[r] + num_scheduled[r]
        )

    token_k = request_k[req_idx]
    withdrawn = is_vision & (token_k <= group_starts[-1])  # K = N withdraws nothing
    leaves_at = np.where(withdrawn, token_k, np.iinfo(np.int64).max)
    withdrawals, alive = [], np.arange(num_tokens)
    for k in np.unique(leaves_at[withdrawn]):
        keep = leaves_at[alive] != k
        withdrawals.append(Withdrawal(layer=int(k), keep_index=np.flatnonzero(keep)))
        alive = alive[keep]

    groups: dict[int, GroupLayout] = {}
    by_compaction: dict[bytes, GroupLayout] = {}
    for s in group_starts:
        compacted = has_vision & (request_k <= s)
        if not compacted.any():
            continue
        key = compacted.tobytes()
        if key not in by_compaction:
            rows = np.flatnonzero(~(is_vision & (token_k <= s)))
            logical = pos - np.where(compacted[req_idx], vision_before, 0)
            counts = np.bincount(req_idx[rows], minlength=num_reqs)
            seq_lens = num_computed + num_scheduled - np.where(compacted, vision_total, 0)
            by_compaction[key] = GroupLayout(
                alive_index=rows,
                logical_positions=logical[rows],
                positions=pos[rows],
                query_start_loc=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                seq_lens=seq_lens.astype(np.int32),
            )
        groups[s] = by_compaction[key]
    return StepPlan(num_tokens=num_tokens, withdrawals=withdrawals, out_index=alive, groups=groups)


def _plan_past_vision(
    num_scheduled: np.ndarray,
    num_computed: np.ndarray,
    batch: BatchVision,
    group_starts: Sequence[int],
) -> StepPlan:
    """The plan of a step in which every request's tokens lie past its vision tokens
    (every decode step): nothing is withdrawn, every group sees every row, and a
    compacted request's positions shift down by its vision total."""
    ends = np.cumsum(num_scheduled)
    num_tokens = int(ends[-1])
    if num_tokens == len(num_scheduled):  # one token per request
        req_idx, pos = np.arange(num_tokens), num_computed.copy()
    else:
        req_idx = np.repeat(np.arange(len(num_scheduled)), num_scheduled)
        pos = num_computed[req_idx] + np.arange(num_tokens) - (ends - num_scheduled)[req_idx]
    alive = np.arange(num_tokens)
    query_start_loc = np.concatenate([[0], ends]).astype(np.int32)
    groups: dict[int, GroupLayout] = {}
    by_compaction: dict[bytes, GroupLayout] = {}
    for s in group_starts:
        compacted = batch.has_vision & (batch.k <= s)
        if not compacted.any():
            continue
        key = compacted.tobytes()
        if key not in by_compaction:
            shift = np.where(compacted, batch.total, 0)
            by_compaction[key] = GroupLayout(
                alive_index=alive,
                logical_positions=pos - shift[req_idx],
                positions=pos,
                query_start_loc=query_start_loc,
                seq_lens=(num_computed + num_scheduled - shift).astype(np.int32),
            )
        groups[s] = by_compaction[key]
    return StepPlan(num_tokens=num_tokens, withdrawals=[], out_index=alive, groups=groups)
