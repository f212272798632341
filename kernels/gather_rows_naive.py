"""Plain PyTorch row gather: the reference the Triton kernel is tested against.

It is also the path vLLM's CPU build takes, since that build has no Triton backend.
"""

from __future__ import annotations

import torch


def gather_rows_naive(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Keep the token rows named by ``index``, in that order, from all three tensors.

    Shapes: ``hidden`` [T, H], ``residual`` [T, H] or None, ``positions`` [T],
    ``index`` [M] (int32 or int64, values in [0, T), any order, repeats allowed).
    Returns ``(hidden[index], residual[index] or None, positions[index])`` with shapes
    [M, H], [M, H] or None, [M]; outputs are new contiguous tensors.

    >>> import torch
    >>> h = torch.arange(12.0).view(4, 3)
    >>> out_h, out_r, out_p = gather_rows_naive(h, None, torch.arange(4), torch.tensor([2, 0]))
    >>> out_h.tolist(), out_r, out_p.tolist()
    ([[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]], None, [2, 0])
    """
    out_residual = None if residual is None else residual.index_select(0, index)
    return hidden.index_select(0, index), out_residual, positions.index_select(0, index)
