"""Where a request's vision tokens are: shared by the KV manager and the model runner.

Both sides must agree exactly on which token positions are withdrawn, so both derive
them from the request's multimodal placeholder ranges (``mm_features[i].mm_position``).

Which tokens are vision tokens: every position inside an image or video placeholder
range that receives a vision-tower embedding. For the LLaVA family served here (LLaVA,
LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video) vLLM's processors fill a range with the
image / video token id only and give it no ``is_embed`` mask, so that is the whole range:
LLaVA-NeXT's and OneVision's ``image_newline`` rows, every pooled video frame token and
OneVision's newline token after each video included; exactly the positions holding the
image or video token id. A range WITH an ``is_embed`` mask (vLLM's
``PromptUpdateDetails.select_token_id``, e.g. Pixtral-style ``[IMG_BREAK]`` /
``[IMG_END]`` tokens inside a LLaVA image range) keeps its non-embed positions: they are
ordinary text tokens, so only the embed runs are withdrawn. Other modalities (audio) are
never withdrawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint [start, end) position ranges

VISION_MODALITIES = frozenset({"image", "video"})


def _embed_runs(position: Any) -> list[tuple[int, int]]:
    """[start, end) runs of a placeholder's positions that receive embeddings."""
    start, length = position.offset, position.length
    is_embed = getattr(position, "is_embed", None)
    if is_embed is None:
        return [(start, start + length)] if length else []
    mask = [bool(x) for x in is_embed.tolist()]
    runs, run_start = [], None
    for i, embed in enumerate([*mask, False]):
        if embed and run_start is None:
            run_start = i
        elif not embed and run_start is not None:
            runs.append((start + run_start, start + i))
            run_start = None
    return runs


def vision_ranges(mm_features: Iterable[Any] | None) -> Ranges:
    """Sorted [start, end) ranges of the vision tokens (image and video placeholders,
    embed positions only) of one request."""
    ranges = [
        run
        for f in mm_features or ()
        if f.modality in VISION_MODALITIES
        for run in _embed_runs(f.mm_position)
    ]
    return tuple(sorted(ranges))


def vision_tokens_below(ranges: Sequence[tuple[int, int]], n: int) -> int:
    """How many vision positions are < n."""
    return sum(max(0, min(end, n) - start) for start, end in ranges if start < n)


def kept_tokens(ranges: Sequence[tuple[int, int]], n: int) -> int:
    """How many of the first n positions survive withdrawal (the text tokens)."""
    return n - vision_tokens_below(ranges, n)


@dataclass(frozen=True, slots=True)
class RequestVision:
    """One request's K and vision ranges, with the totals every step asks for."""

    k: int
    ranges: Ranges
    total: int = field(init=False)  # vision tokens in the request
    end: int = field(init=False)  # one past its last vision position (0 without vision)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", sum(b - a for a, b in self.ranges))
        object.__setattr__(self, "end", self.ranges[-1][1] if self.ranges else 0)

    def kept(self, n: int) -> int:
        """How many of the first n positions survive withdrawal (the text tokens)."""
        return n - self.total if n >= self.end else kept_tokens(self.ranges, n)

    def withdrawn_below(self, layer: int) -> bool:
        """Whether layer ``layer`` no longer sees this request's vision tokens."""
        return self.total > 0 and layer >= self.k


def request_vtw_info(vtw_config: Any, sampling_params: Any, mm_features: Any) -> RequestVision:
    """K and vision ranges of one request, from its sampling params and multimodal features.

    The scheduler (KV sizes) and the model runner (compaction) live in different
    processes and must agree exactly, so both call this one function.
    """
    extra_args = sampling_params.extra_args if sampling_params is not None else None
    return RequestVision(vtw_config.resolve_k(extra_args), vision_ranges(mm_features))
