"""Paged KV for VTW: one KV cache group per span of layers, sized by what it keeps.

Every decoder layer reports a :class:`VTWAttentionSpec` naming the first layer of its
layer span. Specs of different spans refuse to merge, so vLLM's hybrid KV manager
makes one KV cache group per span, all drawing from one block pool. The group
starting at layer ``s`` holds, for a request with withdrawal layer K:

- every token, if s < K (these layers still see the image): the stock layout;
- only its text tokens, if s >= K and the request has images (the group is
  *compacted* for it): ``ceil(kept_tokens / block_size)`` blocks, where kept tokens
  are the request's non-vision tokens so far. Its block table indexes the request's
  COMPACTED sequence (text tokens in order), which the model runner mirrors in slot
  mappings and attention metadata, so stock attention backends work unchanged.

Example, block_size 16, prompt = 5 text + 576 vision + 30 text tokens, K = 4, spans of
4 layers on 8: group 0 (layers 0-3) holds cdiv(611, 16) = 39 blocks, group 1 (layers
4-7) holds cdiv(35, 16) = 3 blocks; after 20 decode tokens 40 and 4.

Prefix caching. A group's stock-layout blocks use vLLM's own keys and code. A compacted
block's content depends on the full prefix before it (images included) and on K, and
its boundaries do not line up with the full sequence's blocks, so it is registered
under keys of its own, at each full-sequence block boundary I (prefix [0, I*B), with
``q, r = divmod(kept(I*B), B)``):

- F key ``(vtw, "F", K, hash_I, group)``: compacted block q-1, when it became full
  between boundaries I-1 and I;
- P key ``(vtw, "P", K, hash_I, group)``: compacted block q, valid for its first r
  tokens, when r != 0;
- where no vision token lies below I*B, the compacted layout is the stock one: the
  stock key (so the text before an image is shared with every K and with stock).

``hash_I`` is vLLM's chained block hash of [0, I*B): tokens, images (content hash and
offset), LoRA, cache salt. A hit of L full tokens then needs the F blocks up to kept(L)
and, when kept(L) % B != 0, the P block at L, which vLLM's partial-hit copy-on-write
copies into a private block. Example, B = 128, K = 4, turn 1 = 5 text + 576 vision +
30 text tokens: group 1 (compacted) registers P keys at boundaries 1-4 (kept 5: block 0
holds 5 tokens) and at boundary 5 (640 tokens, kept 64). Turn 2 resends turn 1, its
answer and a question: its hit is L = 640 in every group; group 0 takes 5 stock blocks,
group 1 the block under P(5), copied into a private block whose first 64 tokens are valid.

Compacted keys are registered only for tokens computed in earlier steps (a copy reads
the source block at the start of a step), and when the request ends or is preempted.
``VTWScheduler._get_local_prefix_cache_hit`` asks every group for its longest hit
(:meth:`VTWManager.vtw_longest_hit`), takes the shortest, and trims each group's blocks
to it (:meth:`VTWManager.vtw_trim`): vLLM's coordinator assumes block i <-> tokens
[iB, (i+1)B) in every full-attention group, which compacted groups break.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import (
    BlockHash,
    BlockHashWithGroupId,
    make_block_hash_with_group_id,
    resolve_block_hashes,
)
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.request import Request

from vtw_vllm.vision_ranges import Ranges, RequestVision, vision_tokens_below

KEY_VERSION = b"vtw1"


@dataclass(frozen=True, kw_only=True)
class VTWAttentionSpec(FullAttentionSpec):
    """Full attention whose KV holds withdrawn tokens only below a request's K."""

    first_layer: int = 0  # first decoder layer of this KV cache group

    @classmethod
    def merge(cls, specs: list[KVCacheSpec]) -> VTWAttentionSpec:
        # Strict: layers of different layer groups must land in different KV groups.
        if not all(type(s) is cls and s.first_layer == specs[0].first_layer for s in specs):
            raise AssertionError("VTW layers of different layer groups do not merge")
        base = FullAttentionSpec.merge(specs)
        kwargs = {f.name: getattr(base, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**kwargs, first_layer=specs[0].first_layer)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            type(s) is type(self) and s.first_layer == self.first_layer
            for s in kv_cache_specs.values()
        )


class VTWRequestInfo(Protocol):
    """What the scheduler tells the managers: a request's (K, vision ranges)."""

    def vtw_request_info(self, request_id: str) -> RequestVision: ...


def _boundary(ranges: Ranges, n: int, block_size: int) -> tuple[int, int, int]:
    """(vision tokens below n, full compacted blocks, tokens in the partial one)."""
    vision = vision_tokens_below(ranges, n)
    q, r = divmod(n - vision, block_size)
    return vision, q, r


class VTWManager(FullAttentionManager):
    """Full-attention manager that counts only the tokens its layer group keeps.

    Every token count the scheduler passes in (admission, chunks, decode, lookahead,
    prefix hits) is translated through the request's kept tokens when this group is
    compacted for it; otherwise it is vLLM's FullAttentionManager, caching included.
    """

    counter: VTWRequestInfo | None = None  # bound by VTWScheduler

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Compacted requests: the next full-sequence block boundary to register keys at.
        self._vtw_next_boundary: dict[str, int] = {}

    # -- token counts ------------------------------------------------------------------

    def _info(self, request_id: str) -> RequestVision:
        if self.counter is None:
            raise RuntimeError("VTWAttentionSpec layers need the VTW scheduler (--scheduler-cls)")
        return self.counter.vtw_request_info(request_id)

    def is_compacted(self, request_id: str) -> bool:
        return self._info(request_id).withdrawn_below(self.kv_cache_spec.first_layer)

    def _kept(self, request_id: str, num_tokens: int) -> int:
        info = self._info(request_id)
        if self.kv_cache_spec.first_layer < info.k:
            return num_tokens
        return info.kept(num_tokens)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        return super().get_num_blocks_to_allocate(
            request_id,
            self._kept(request_id, num_tokens),
            new_computed_blocks,
            self._kept(request_id, total_computed_tokens),
            self._kept(request_id, num_local_computed_tokens),
            self._kept(request_id, num_tokens_main_model),
            apply_admission_cap,
            prefill_end,
        )

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list:
        return super().allocate_new_blocks(
            request_id,
            self._kept(request_id, num_tokens),
            self._kept(request_id, num_tokens_main_model),
        )

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence,
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        if num_external_computed_tokens:
            raise RuntimeError("VTW KV groups take no externally computed tokens")
        # vLLM's copy-on-write fires when the kept count ends inside a block.
        kept = self._kept(request_id, num_local_computed_tokens)
        super().add_local_computed_blocks(request_id, new_computed_blocks, kept, 0)
        self._vtw_next_boundary[request_id] = num_local_computed_tokens // self.block_size + 1

    def pop_blocks_for_free(self, request_id: str) -> list:
        self._vtw_next_boundary.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    # -- prefix caching ----------------------------------------------------------------

    def _key(self, kind: bytes, k: int, block_hash: BlockHash) -> BlockHash:
        digest = hashlib.sha256(KEY_VERSION + kind + k.to_bytes(2, "big") + block_hash)
        return BlockHash(digest.digest())

    def _boundary_key(
        self, kind: bytes, k: int, vision: int, block_hash: BlockHash
    ) -> BlockHashWithGroupId:
        """A boundary's key: the stock one while no vision token lies below it."""
        key = block_hash if vision == 0 else self._key(kind, k, block_hash)
        return make_block_hash_with_group_id(key, self.kv_cache_group_id)

    def _hashes(self, request: Request):
        return resolve_block_hashes(
            request.block_hashes, self.block_pool.hash_block_size, self.block_size
        )

    def _cached(self, key: BlockHashWithGroupId):
        return self.block_pool.cached_block_hash_to_block.get_one_block(key)

    def vtw_longest_hit(self, request: Request, max_length: int) -> tuple[list, int]:
        """This group's longest prefix hit of at most ``max_length`` full tokens (a
        multiple of the block size), and its blocks; every shorter block-aligned length
        is served by :meth:`vtw_trim` of the same list."""
        if not self.is_compacted(request.request_id):
            blocks, length = FullAttentionManager.find_longest_cache_hit(
                request.block_hashes,
                max_length,
                [self.kv_cache_group_id],
                self.block_pool,
                self.kv_cache_spec,
                False,
                self.cache_hit_alignment_tokens,
            )
            return blocks[0], length
        info = self._info(request.request_id)
        k, ranges = info.k, info.ranges
        hashes, size = self._hashes(request), self.block_size
        full: list = []
        best: tuple[int, int, object] = (0, 0, None)  # (length, full blocks, partial block)
        num_full = 0
        for i in range(1, min(max_length // size, len(hashes)) + 1):
            vision, q, r = _boundary(ranges, i * size, size)
            if q > num_full:  # compacted block q - 1 became full below this boundary
                block = self._cached(self._boundary_key(b"F", k, vision, hashes[i - 1]))
                if block is None:
                    break  # every longer hit needs this block too
                full.append(block)
                num_full = q
            if r == 0:
                best = (i * size, q, None)
                continue
            tail = self._cached(self._boundary_key(b"P", k, vision, hashes[i - 1]))
            if tail is not None:
                best = (i * size, q, tail)
        length, q, tail = best
        return full[:q] + ([tail] if tail is not None else []), length

    def vtw_trim(self, request_id: str, blocks: list, length: int) -> list:
        """The blocks of ``blocks`` (from :meth:`vtw_longest_hit`) that a hit of
        ``length`` full tokens uses."""
        return blocks[: cdiv(self._kept(request_id, length), self.block_size)]

    def cache_blocks(self, request: Request, num_tokens: int, *args, **kwargs) -> None:
        if not self.is_compacted(request.request_id):
            super().cache_blocks(request, num_tokens, *args, **kwargs)
            return
        # Only tokens computed in earlier steps: a hit's copy-on-write reads its source
        # block at the start of the hitting request's step.
        self.cache_computed_blocks(request, num_tokens)

    def cache_computed_blocks(self, request: Request, num_tokens: int | None = None) -> None:
        """Register a compacted request's keys for its computed tokens (at most
        ``num_tokens``); called each step and when the request ends or is preempted."""
        if not self.enable_caching or not self.is_compacted(request.request_id):
            return
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        if not blocks:
            return
        computed = request.num_computed_tokens - request.num_in_flight_tokens
        if num_tokens is not None:
            computed = min(computed, num_tokens)
        info = self._info(rid)
        k, ranges = info.k, info.ranges
        hashes, size = self._hashes(request), self.block_size
        start = self._vtw_next_boundary.get(rid, 1)
        end = min(computed // size, len(hashes))
        for i in range(start, end + 1):
            vision, q, r = _boundary(ranges, i * size, size)
            _, q_before, _ = _boundary(ranges, (i - 1) * size, size)
            if q > q_before:
                key = self._boundary_key(b"F", k, vision, hashes[i - 1])
                self.block_pool._insert_block_hash(key, blocks[q - 1], num_tokens=i * size)
            if r:
                key = self._boundary_key(b"P", k, vision, hashes[i - 1])
                self.block_pool._insert_block_hash(key, blocks[q], num_tokens=i * size)
        self._vtw_next_boundary[rid] = max(start, end + 1)
        # vLLM reads this as "the request is running" (no new prefix hits for it).
        self.num_cached_block.setdefault(rid, 0)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kw):
        """A miss: lookups go through :meth:`vtw_longest_hit`, which needs the request.
        (Only KV connectors call this directly, and VTW refuses them.)"""
        return tuple([] for _ in kv_cache_group_ids), 0


def register_kv_cache_spec() -> None:
    """Make vLLM pick :class:`VTWManager` for :class:`VTWAttentionSpec` layers."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()  # built-ins first (see vLLM's registry)
    KVCacheSpecRegistry.register(VTWAttentionSpec, VTWManager, VTWAttentionSpec)
