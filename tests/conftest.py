"""Shared helpers: one real vLLM engine per test module (an engine start costs ~30 s)."""

import contextlib
import gc
from collections.abc import Iterator

import pytest
import torch

# Engine defaults that suit the 2-core CPU machines and the tiny fixtures.
ENGINE_DEFAULTS = dict(
    dtype="float32",
    max_model_len=4096,
    max_num_seqs=8,
    kv_cache_memory_bytes=64 * 2**20,
    enforce_eager=True,
    max_logprobs=-1,
    seed=0,
)


@contextlib.contextmanager
def vllm_engine(model: str, **overrides) -> Iterator["object"]:
    """Start a real vLLM ``LLM`` and shut it down afterwards, freeing its processes."""
    from vllm import LLM

    llm = LLM(model=model, **{**ENGINE_DEFAULTS, **overrides})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float = 0.0,
    what: str = "values",
) -> None:
    """torch.testing.assert_close, reporting the worst mismatches first."""
    diff = (actual - expected).abs()
    if diff.numel() and not torch.all(diff <= atol + rtol * expected.abs()):
        worst = torch.topk(diff.flatten(), k=min(5, diff.numel()))
        rows = [
            f"  index {i}: actual {actual.flatten()[i]:.6f} expected {expected.flatten()[i]:.6f}"
            for i in worst.indices.tolist()
        ]
        pytest.fail(f"{what} differ (max {diff.max():.3g} > atol {atol}):\n" + "\n".join(rows))
