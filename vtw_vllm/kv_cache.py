"""Paged KV for VTW: one KV cache group per block of layers, sized by what it keeps.

Every decoder layer reports a :class:`VTWAttentionSpec` naming the first layer of its
layer group. Specs of different groups refuse to merge, so vLLM's hybrid KV manager
makes one KV cache group per layer group, all drawing from one block pool. The group
starting at layer ``s`` holds, for a request with withdrawal layer K:

- every token, if s < K (these layers still see the image);
- only its text tokens, if s >= K: ``ceil(kept_tokens / block_size)`` blocks, where
  kept tokens are the request's non-vision tokens so far. Its block table indexes the
  request's COMPACTED sequence (text tokens in order), which the model runner mirrors in
  slot mappings and attention metadata, so stock attention backends work unchanged.

Example, block_size 16, prompt = 5 text + 576 vision + 30 text tokens, K = 4, group
size 4 on 8 layers: group 0 (layers 0-3) holds cdiv(611, 16) = 39 blocks, group 1
(layers 4-7) holds cdiv(35, 16) = 3 blocks; after 20 decode tokens 40 and 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec


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


class KeptTokenCounter(Protocol):
    """What the scheduler tells the manager: how many of a request's first n tokens a
    group starting at ``first_layer`` must hold."""

    def kept(self, request_id: str, num_tokens: int, first_layer: int) -> int: ...


class VTWManager(FullAttentionManager):
    """Full-attention manager that counts only the tokens its layer group keeps.

    Every token count the scheduler passes in (admission, chunks, decode, lookahead)
    is translated through :meth:`KeptTokenCounter.kept`. Prefix caching is refused
    here (compacted blocks do not line up with the request's block hashes); the model
    config hook switches it off for VTW models.
    """

    counter: KeptTokenCounter | None = None  # bound by VTWScheduler

    def _kept(self, request_id: str, num_tokens: int) -> int:
        if self.counter is None:
            raise RuntimeError("VTWAttentionSpec layers need the VTW scheduler (--scheduler-cls)")
        return self.counter.kept(request_id, num_tokens, self.kv_cache_spec.first_layer)

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
        if new_computed_blocks:
            raise RuntimeError("VTW KV groups never take prefix-cache hits")
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

    def cache_blocks(self, *args, **kwargs) -> None:
        """No prefix caching of compacted blocks."""

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kw):
        return tuple([] for _ in kv_cache_group_ids), 0


def register_kv_cache_spec() -> None:
    """Make vLLM pick :class:`VTWManager` for :class:`VTWAttentionSpec` layers."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()  # built-ins first (see vLLM's registry)
    KVCacheSpecRegistry.register(VTWAttentionSpec, VTWManager, VTWAttentionSpec)
