"""The Triton row gather must equal the index_select reference exactly (it is a copy).

CPU runs go through Triton's interpreter. TRITON_INTERPRET is deliberately *not* set at
module level: Triton 3.9 reads it (through ``triton.knobs``) when ``@triton.jit``
decorates, i.e. when ``vtw_vllm.kernels.gather_rows`` is first imported, and another
test may import that module before this one; a process-wide setting would also turn
every other module's kernels into interpreted ones on GPU runs. Instead the launcher
itself builds the interpreted kernel for CPU tensors, whatever the import order, and
only the dispatch tests set the variable, through ``monkeypatch``.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from vtw_vllm.kernels.gather_rows_naive import gather_rows_naive

# The module objects themselves (tests patch their attributes), safe even if the package
# ever re-exports functions under the modules' names.
gr = importlib.import_module("vtw_vllm.kernels.gather_rows")
naive_mod = importlib.import_module("vtw_vllm.kernels.gather_rows_naive")

HAS_TRITON = gr.triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def make_inputs(
    num_tokens: int,
    hidden_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    *,
    with_residual: bool = True,
    row_pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random hidden/residual (row stride H + row_pad) and distinct positions."""
    gen = torch.Generator().manual_seed(num_tokens * 10007 + hidden_size)

    def rows() -> torch.Tensor:
        full = torch.randn(num_tokens, hidden_size + row_pad, generator=gen)
        return full.to(device=device, dtype=dtype)[:, :hidden_size]

    hidden = rows()
    residual = rows() if with_residual else None
    positions = (torch.arange(num_tokens) * 7 + 3).to(device)
    return hidden, residual, positions


def random_index(num_tokens: int, num_kept: int, dtype: torch.dtype = torch.int64):
    """Distinct, unsorted row ids, as a withdrawal mask's survivors after a shuffle."""
    gen = torch.Generator().manual_seed(num_tokens + num_kept)
    return torch.randperm(num_tokens, generator=gen)[:num_kept].to(dtype)


def assert_same(out: tuple, ref: tuple) -> None:
    """Bitwise equality plus shape, dtype and contiguity of every output."""
    for got, want in zip(out, ref, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.is_contiguous()
        assert torch.equal(got, want)


def check(hidden, residual, positions, index) -> None:
    out = gr.gather_rows(hidden, residual, positions, index)
    assert_same(out, gather_rows_naive(hidden, residual, positions, index))


SHAPES = [(1, 1), (7, 31), (16, 100), (24, 64), (5, 4097)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-H{s[1]}")
def test_interpreter_matches_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    num_tokens, hidden_size = shape
    hidden, residual, positions = make_inputs(num_tokens, hidden_size, dtype)
    check(hidden, residual, positions, random_index(num_tokens, max(1, num_tokens // 2)))


@needs_triton
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_index_dtype_and_missing_residual(index_dtype: torch.dtype, with_residual: bool) -> None:
    hidden, residual, positions = make_inputs(9, 48, with_residual=with_residual)
    check(hidden, residual, positions, random_index(9, 4, index_dtype))


KEEP_PATTERNS = {
    "all-kept": lambda t: torch.arange(t),
    "none-kept": lambda t: torch.empty(0, dtype=torch.int64),
    "reversed": lambda t: torch.arange(t - 1, -1, -1),
    "repeats": lambda t: torch.tensor([3, 3, 0, t - 1, 0]),
}


@needs_triton
@pytest.mark.parametrize("pattern", KEEP_PATTERNS)
def test_keep_patterns(pattern: str) -> None:
    hidden, residual, positions = make_inputs(12, 40)
    check(hidden, residual, positions, KEEP_PATTERNS[pattern](12))


@needs_triton
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
def test_empty_batch(with_residual: bool) -> None:
    hidden, residual, positions = make_inputs(0, 16, with_residual=with_residual)
    check(hidden, residual, positions, torch.empty(0, dtype=torch.int32))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
def test_strided_inputs(dtype: torch.dtype) -> None:
    """Row stride > H (views of a wider buffer), strided positions and index."""
    hidden, residual, positions = make_inputs(10, 33, dtype, row_pad=11)
    assert hidden.stride(0) == 44
    positions = torch.arange(20)[::2] * 5
    index = torch.tensor([9, 0, 4, 4, 2, 7, 1, 1])[::2]
    check(hidden, residual, positions, index)


@needs_triton
def test_rejects_bad_inputs() -> None:
    hidden, residual, positions = make_inputs(6, 8)
    index = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="contiguous last dim"):
        gr.gather_rows(hidden.t().contiguous().t(), None, positions, index)
    with pytest.raises(ValueError, match="residual must match"):
        gr.gather_rows(hidden, residual[:5], positions, index)
    with pytest.raises(TypeError, match="residual dtype"):
        gr.gather_rows(hidden, residual.float(), positions, index)
    with pytest.raises(ValueError, match="positions must be"):
        gr.gather_rows(hidden, residual, positions[:5], index)
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        gr.gather_rows(hidden, residual, positions, index.float())
    with pytest.raises(ValueError, match="index must be 1-D"):
        gr.gather_rows(hidden, residual, positions, index.view(1, 2))


@needs_triton
def test_auto_uses_kernel_when_interpreting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []
    real = gr.gather_rows
    monkeypatch.setattr(gr, "gather_rows", lambda *args: calls.append("triton") or real(*args))
    hidden, residual, positions = make_inputs(8, 24)
    index = random_index(8, 3)
    assert_same(
        gr.gather_rows_auto(hidden, residual, positions, index),
        gather_rows_naive(hidden, residual, positions, index),
    )
    assert calls == ["triton"]


def test_auto_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CPU build: no interpreter requested, so the plain PyTorch path runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def no_triton(*args):
        raise AssertionError("the Triton kernel ran on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(gr, "gather_rows", no_triton)
    hidden, _, positions = make_inputs(8, 24, with_residual=False)
    out_hidden, out_residual, out_positions = gr.gather_rows_auto(
        hidden, None, positions, torch.tensor([5, 1])
    )
    assert torch.equal(out_hidden, hidden[[5, 1]]) and out_residual is None
    assert out_positions.tolist() == [38, 10]


@pytest.mark.parametrize(
    "module",
    [naive_mod, pytest.param(gr, marks=needs_triton)],
    ids=["naive", "triton"],
)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, raise_on_error=True)
    assert result.attempted > 0


CUDA_SHAPES = [(2048, 4096), (1000, 5120), (333, 4097), (64, 100)]


@needs_triton
@needs_cuda
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.get)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"T{s[0]}-H{s[1]}")
def test_cuda_matches_reference(
    shape: tuple[int, int], dtype: torch.dtype, with_residual: bool
) -> None:
    num_tokens, hidden_size = shape
    hidden, residual, positions = make_inputs(
        num_tokens, hidden_size, dtype, "cuda", with_residual=with_residual, row_pad=8
    )
    for index_dtype in (torch.int32, torch.int64):
        index = random_index(num_tokens, num_tokens // 10 + 1, index_dtype).cuda()
        check(hidden, residual, positions, index)
    check(hidden, residual, positions, torch.arange(num_tokens, device="cuda"))
    check(hidden, residual, positions, torch.empty(0, dtype=torch.int64, device="cuda"))
