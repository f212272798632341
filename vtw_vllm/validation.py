"""Request validation for VTW: ``vtw_k`` itself, and what a K < N request may ask.

1. ``vtw_k`` (ValueError offline, HTTP 400 served). vLLM runs every custom logits
   processor's ``validate_params`` on each request before it reaches the engine, and
   turns its ValueError into a validation error. That is the extension point for
   checking ``SamplingParams.extra_args``, so VTW registers :class:`VTWRequestValidator`
   only to validate: its ``apply`` leaves the logits untouched and it declares itself
   argmax-invariant. ``validate_params`` is a classmethod without the model config, so
   the config hook stores the deployment's :class:`~vtw_vllm.config.VTWConfig` on the
   class in the process that builds the engine config (the one that validates).
2. :func:`validate_request` needs the rendered prompt (its length and image positions),
   so it runs where the request has been rendered: after ``InputProcessor.process_inputs``
   in the front end, and again in the engine process for requests that reach it another
   way (both wrappers in :mod:`vtw_vllm.vllm_patches`). With K < N it refuses

   - a prompt whose last token is a vision (image or video) token: that row is the one
     sampled from, and it would be withdrawn at layer K (its logits would not be the
     model's);
   - prompt log-probs on a prompt with images: the withdrawn rows have none.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vtw_vllm.config import EXTRA_ARGS_KEY, VTWConfig
from vtw_vllm.vision_ranges import vision_ranges

QUALNAME = "vtw_vllm.validation:VTWRequestValidator"


def validate_request(
    vtw: VTWConfig, sampling_params: Any, num_prompt_tokens: int, mm_features: Any
) -> int:
    """The request's K; raises VLLMValidationError for what VTW cannot serve."""
    extra_args = getattr(sampling_params, "extra_args", None)
    try:
        k = vtw.resolve_k(extra_args)
    except ValueError as e:
        raise VLLMValidationError(str(e), parameter=EXTRA_ARGS_KEY) from e
    ranges = vision_ranges(mm_features)
    if k >= vtw.num_layers or not ranges:
        return k
    if ranges[-1][1] >= num_prompt_tokens:
        raise VLLMValidationError(
            f"with {EXTRA_ARGS_KEY}={k} < {vtw.num_layers}, a prompt must not end with an "
            f"image or video: its last token is the row the first output token is sampled "
            f"from, and vision rows are withdrawn at layer {k}. Add text after it, or use "
            f"{EXTRA_ARGS_KEY}={vtw.num_layers}",
            parameter=EXTRA_ARGS_KEY,
        )
    if getattr(sampling_params, "prompt_logprobs", None) is not None:
        raise VLLMValidationError(
            f"prompt_logprobs are not defined with {EXTRA_ARGS_KEY}={k} < {vtw.num_layers} "
            f"on a prompt with images (its image rows are withdrawn at layer {k}); "
            f"use {EXTRA_ARGS_KEY}={vtw.num_layers}",
            parameter="prompt_logprobs",
        )
    return k


class VTWRequestValidator(LogitsProcessor):
    vtw_config: ClassVar[VTWConfig | None] = None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if cls.vtw_config is not None:
            cls.vtw_config.resolve_k(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
