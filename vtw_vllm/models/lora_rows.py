"""LoRA with VTW: each row's adapter follows the row through a withdrawal.

vLLM's LoRA layers read the step's per-token adapter indices from one ``PunicaWrapper``
shared by the language model's layers, filled by the runner for the whole flat batch
before the forward. After a withdrawal the deeper layers see fewer rows, so the
wrapper's token indices (and the kernels' per-segment metadata derived from them) are
replaced by those of the rows kept: the same gather as for the hidden states, once per
distinct K. The runner refills the wrapper from scratch every step, so nothing is
restored afterwards; the logits' adapter indices are per request and stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def find_punica_wrapper(layers: Iterable[nn.Module]):
    """The wrapper vLLM's LoRA layers in ``layers`` share, or None without LoRA."""
    for layer in layers:
        for module in layer.modules():
            wrapper = getattr(module, "punica_wrapper", None)
            if wrapper is not None:
                return wrapper
    return None


def keep_lora_rows(wrapper, keep: torch.Tensor) -> None:
    """Reduce the wrapper's per-token adapter indices to the rows ``keep`` (non-empty)."""
    rows = wrapper.token_lora_indices.index_select(0, keep)
    wrapper._token_lora_indices[: rows.shape[0]].copy_(rows)
    wrapper.indices_len[0] = rows.shape[0]
    if hasattr(wrapper, "token_mapping_meta"):  # PunicaWrapperGPU (Triton kernels)
        wrapper.token_mapping_meta.prepare_tensors(rows)
    elif wrapper.is_prefill:  # PunicaWrapperCPU's segment metadata (decode reads rows)
        wrapper._update_prefill_metadata(rows)
