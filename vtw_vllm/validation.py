"""Front-end validation of the per-request ``vtw_k`` (ValueError offline, HTTP 400 served).

vLLM runs every custom logits processor's ``validate_params`` on each request before it
reaches the engine, and turns its ValueError into a validation error (HTTP 400 from the
OpenAI server). That is the extension point for checking ``SamplingParams.extra_args``,
so VTW registers this no-op processor only to validate: its ``apply`` leaves the logits
untouched and it declares itself argmax-invariant.

``validate_params`` is a classmethod without the model config, so the config hook stores
the deployment's :class:`~vtw_vllm.config.VTWConfig` on the class in the process that
builds the engine config (the one that validates requests).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vtw_vllm.config import VTWConfig

QUALNAME = "vtw_vllm.validation:VTWRequestValidator"


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
