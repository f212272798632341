"""VTW settings, read from the model's HF config (``hf_overrides``) and validated once.

``vtw_k`` is the deployment's default withdrawal layer: decoder layers with 0-based
index < K see the vision tokens, layers >= K do not; K = N means no withdrawal.
Per-request K comes from ``SamplingParams.extra_args["vtw_k"]``.

The KV cache keeps one cache group per block of ``vtw_layer_group_size`` layers, so a
request's K must fall on a group boundary. The group size is shrunk (gcd) so that the
deployment's own ``vtw_k`` is always allowed: any K from 1 to N is deployable.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

EXTRA_ARGS_KEY = "vtw_k"
DEFAULT_LAYER_GROUP_SIZE = 4  # allows the paper's K: 16 of 32 and 20 of 40 layers


class VTWConfig(BaseModel):
    """The VTW part of a model config."""

    model_config = ConfigDict(frozen=True)

    num_layers: int = Field(gt=0)
    default_k: int | None = Field(default=None, ge=1)
    layer_group_size: int = Field(default=DEFAULT_LAYER_GROUP_SIZE, ge=1)

    @model_validator(mode="after")
    def _check(self) -> VTWConfig:
        if self.default_k is not None and self.default_k > self.num_layers:
            raise ValueError(
                f"vtw_k={self.default_k} is above the number of decoder layers ({self.num_layers})"
            )
        return self

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> VTWConfig:
        text_config = getattr(hf_config, "text_config", hf_config)
        return cls(
            num_layers=text_config.num_hidden_layers,
            default_k=getattr(hf_config, "vtw_k", None),
            layer_group_size=getattr(hf_config, "vtw_layer_group_size", DEFAULT_LAYER_GROUP_SIZE),
        )

    @property
    def group_size(self) -> int:
        """Layers per KV cache group: divides N and the deployment's K."""
        size = math.gcd(self.layer_group_size, self.num_layers)
        return math.gcd(size, self.default_k) if self.default_k is not None else size

    def group_start(self, layer: int) -> int:
        """First layer of the KV cache group holding ``layer``."""
        return layer - layer % self.group_size

    @property
    def allowed_k(self) -> list[int]:
        return list(range(self.group_size, self.num_layers + 1, self.group_size))

    def resolve_k(self, extra_args: dict[str, Any] | None) -> int:
        """The K of one request: its ``extra_args["vtw_k"]``, else the default, else N.

        Raises ValueError naming the allowed values for anything else.
        """
        value = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if value is None:
            value = self.default_k if self.default_k is not None else self.num_layers
        if isinstance(value, bool) or not isinstance(value, int) or value not in self.allowed_k:
            raise ValueError(
                f"{EXTRA_ARGS_KEY} must be an integer in {self.allowed_k} (the decoder layers "
                f"from which vision tokens are withdrawn, in steps of the model's KV layer "
                f"group size {self.group_size}; {self.num_layers} = no withdrawal), "
                f"got {value!r}"
            )
        return value
