"""Row compaction for Visual Tokens Withdrawal: one Triton launch gathers the kept rows.

After decoder layer K the vision-token rows leave the flat token batch. Doing that with
three ``index_select`` calls (hidden, residual, positions) costs three launches; the
kernel here does all three in one pass at close to copy bandwidth.

Triton is optional: without it (vLLM's CPU build) :func:`gather_rows_auto` falls back to
:func:`gather_rows_naive`. On CPU tensors the kernel runs in Triton's interpreter, which
is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from .gather_rows_naive import gather_rows_naive

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: gather_rows_auto uses the reference instead.
    triton = None

# Bytes of one tensor row that a program moves per loop step: with 4 warps, two 16-byte
# vectors per thread per tensor, all loaded before any store.
_CHUNK_BYTES = 4096
_MAX_WARPS = 4
_VECTOR_BYTES = 16
_INDEX_DTYPES = (torch.int32, torch.int64)

if triton is not None:

    @triton.jit
    def _gather_rows_kernel(
        hidden_ptr,
        residual_ptr,
        positions_ptr,
        index_ptr,
        out_hidden_ptr,
        out_residual_ptr,
        out_positions_ptr,
        hidden_size,
        stride_hidden,
        stride_residual,
        stride_positions,
        stride_index,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """out_h[i, :] = h[idx[i], :]; out_r[i, :] = r[idx[i], :]; out_p[i] = p[idx[i]].

        One program per kept row i (grid = (M,)). It walks the hidden dim in BLOCK_H
        chunks, masked at the tail, so any hidden size works. Outputs are contiguous
        (row stride = hidden_size). Offsets are int64 because T * stride can pass 2**31.
        """
        i = tl.program_id(0).to(tl.int64)
        src = tl.load(index_ptr + i * stride_index).to(tl.int64)
        position = tl.load(positions_ptr + src * stride_positions)
        cols = tl.arange(0, BLOCK_H)
        # Loads before stores (here and for the position): the compiler cannot move a
        # load above a store that may alias, so this order keeps all loads in flight.
        for start in range(0, hidden_size, BLOCK_H):
            offs = start + cols
            mask = offs < hidden_size
            h = tl.load(hidden_ptr + src * stride_hidden + offs, mask=mask)
            if HAS_RESIDUAL:
                r = tl.load(residual_ptr + src * stride_residual + offs, mask=mask)
            tl.store(out_hidden_ptr + i * hidden_size + offs, h, mask=mask)
            if HAS_RESIDUAL:
                tl.store(out_residual_ptr + i * hidden_size + offs, r, mask=mask)
        tl.store(out_positions_ptr + i, position)

    @functools.cache
    def _interpreted_kernel():
        """The same kernel for Triton's CPU interpreter.

        ``@triton.jit`` decides between compiled and interpreted when this module is
        imported (it reads TRITON_INTERPRET then), so a module imported before the
        variable was set would hand CPU tensors to the compiler. Building the
        interpreted version on demand makes CPU calls work whatever the import order.
        """
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_gather_rows_kernel.fn)


def _launch_config(hidden_size: int, elem_size: int) -> tuple[int, int]:
    """Pick (BLOCK_H, num_warps) for one program's loop over the hidden dim.

    BLOCK_H covers _CHUNK_BYTES of a row (fewer for short rows): a large chunk keeps many
    bytes in flight per program, which matters when few rows are kept. A masked tail
    step (5120 = 2048 + 2048 + 1024 for bf16) costs issue slots, not bandwidth.
    num_warps gives each thread two 16-byte vectors per tensor per step.
    """
    block = min(_CHUNK_BYTES // elem_size, triton.next_power_of_2(max(hidden_size, 1)))
    vector = max(1, _VECTOR_BYTES // elem_size)
    num_warps = max(1, min(_MAX_WARPS, block // (vector * 32 * 2)))
    return block, num_warps


def _check_inputs(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """Reject what the kernel cannot read correctly, before any launch."""
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(
            f"hidden must be 2-D [T, H] with a contiguous last dim, "
            f"got shape {tuple(hidden.shape)} strides {hidden.stride()}"
        )
    num_tokens = hidden.shape[0]
    if residual is not None:
        if residual.shape != hidden.shape or residual.stride(1) != 1:
            raise ValueError(
                f"residual must match hidden {tuple(hidden.shape)} with a contiguous last "
                f"dim, got shape {tuple(residual.shape)} strides {residual.stride()}"
            )
        if residual.dtype != hidden.dtype:
            raise TypeError(f"residual dtype {residual.dtype} != hidden dtype {hidden.dtype}")
    if positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ValueError(f"positions must be [T={num_tokens}], got {tuple(positions.shape)}")
    if positions.dtype not in _INDEX_DTYPES:
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D [M], got {tuple(index.shape)}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    tensors = [hidden, positions, index] + ([] if residual is None else [residual])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def gather_rows(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Keep the token rows named by ``index`` from hidden, residual and positions at once.

    Shapes: ``hidden`` [T, H] (last dim contiguous, any row stride), ``residual`` [T, H]
    with hidden's dtype or None (vLLM's first layer has none), ``positions`` [T] int32 or
    int64, ``index`` [M] int32 or int64 with values in [0, T) in any order (not checked:
    a value out of range reads out of bounds, as in any CUDA gather). All on one device.
    Returns new contiguous tensors [M, H], [M, H] or None, [M], equal to
    :func:`gather_rows_naive`. CUDA tensors use the compiled kernel, CPU tensors Triton's
    interpreter (slow; for tests). M = 0 returns empty outputs without a launch.

    >>> import torch
    >>> h = torch.arange(12.0).view(4, 3)
    >>> out_h, out_r, out_p = gather_rows(h, None, torch.arange(4), torch.tensor([2, 0]))
    >>> out_h.tolist(), out_r, out_p.tolist()
    ([[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]], None, [2, 0])
    """
    if triton is None:
        raise RuntimeError("gather_rows needs triton; use gather_rows_auto to fall back")
    _check_inputs(hidden, residual, positions, index)
    num_kept, hidden_size = index.shape[0], hidden.shape[1]
    out_hidden = hidden.new_empty((num_kept, hidden_size))
    out_residual = None if residual is None else residual.new_empty((num_kept, hidden_size))
    out_positions = positions.new_empty((num_kept,))
    if num_kept == 0:
        return out_hidden, out_residual, out_positions

    block, num_warps = _launch_config(hidden_size, hidden.element_size())
    kernel = _interpreted_kernel() if hidden.device.type == "cpu" else _gather_rows_kernel
    # Without a residual the kernel never reads these pointers; pass hidden's as dummies.
    res_in = hidden if residual is None else residual
    res_out = out_hidden if out_residual is None else out_residual
    kernel[(num_kept,)](
        hidden,
        res_in,
        positions,
        index,
        out_hidden,
        res_out,
        out_positions,
        hidden_size,
        hidden.stride(0),
        res_in.stride(0),
        positions.stride(0),
        index.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block,
        num_warps=num_warps,
    )
    return out_hidden, out_residual, out_positions


def _interpret_requested() -> bool:
    """TRITON_INTERPRET as Triton itself parses it (1/true/on/yes, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in {"1", "true", "on", "yes"}


def gather_rows_auto(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Same contract as :func:`gather_rows`; picks the implementation per call.

    Triton kernel for CUDA tensors, and for CPU tensors when TRITON_INTERPRET is set (tests);
    :func:`gather_rows_naive` otherwise, e.g. in vLLM's CPU build, which has no Triton
    backend. The variable is read on every call, so setting it late still takes effect.
    """
    use_triton = triton is not None and (
        hidden.is_cuda or (hidden.device.type == "cpu" and _interpret_requested())
    )
    impl = gather_rows if use_triton else gather_rows_naive
    return impl(hidden, residual, positions, index)
