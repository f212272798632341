"""Where a request's vision tokens are: shared by the KV manager and the model runner.

Both sides must agree exactly on which token positions are withdrawn, so both derive
them from the request's multimodal placeholder ranges (``mm_features[i].mm_position``).
Every position inside a placeholder range counts as a vision token (for LLaVA-NeXT this
includes the ``image_newline`` rows), exactly the positions holding the image token id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint [start, end) position ranges


def vision_ranges(mm_features: Iterable[Any] | None) -> Ranges:
    """Sorted [start, end) ranges of the image placeholders of one request."""
    ranges = [
        (f.mm_position.offset, f.mm_position.offset + f.mm_position.length)
        for f in mm_features or ()
        if f.modality == "image"
    ]
    return tuple(sorted(ranges))


def vision_tokens_below(ranges: Sequence[tuple[int, int]], n: int) -> int:
    """How many vision positions are < n."""
    return sum(max(0, min(end, n) - start) for start, end in ranges if start < n)


def kept_tokens(ranges: Sequence[tuple[int, int]], n: int) -> int:
    """How many of the first n positions survive withdrawal (the text tokens)."""
    return n - vision_tokens_below(ranges, n)


def request_vtw_info(vtw_config: Any, sampling_params: Any, mm_features: Any) -> tuple[int, Ranges]:
    """(K, vision ranges) of one request, from its sampling params and multimodal features.

    The scheduler (KV sizes) and the model runner (compaction) live in different
    processes and must agree exactly, so both call this one function.
    """
    extra_args = sampling_params.extra_args if sampling_params is not None else None
    return vtw_config.resolve_k(extra_args), vision_ranges(mm_features)
