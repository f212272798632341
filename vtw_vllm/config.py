"""VTW settings, read from the model's HF config (``hf_overrides``) and validated once.

``vtw_k`` is the deployment's default withdrawal layer: decoder layers with 0-based
index < K see the vision tokens, layers >= K do not; K = N means no withdrawal.
Per-request K comes from ``SamplingParams.extra_args["vtw_k"]``.

Each KV cache group is a span of layers, and a request's K must fall on a span
boundary. Every group costs per-step work (its own block table, slot mapping and
attention metadata), so a deployment should have as few as it needs:

- ``vtw_allowed_k: [16, 32]`` names the K values requests may use; the spans are
  [0, 16) and [16, 32): two KV groups. The deployment's ``vtw_k`` must be one of them.
- otherwise spans of ``vtw_layer_group_size`` layers (default 4: the paper's K, 16 of
  32 and 20 of 40, are allowed), shrunk (gcd) so that N and the deployment's own
  ``vtw_k`` fall on a boundary; a warning is logged when that multiplies the groups.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "vtw_k"
DEFAULT_LAYER_GROUP_SIZE = 4  # allows the paper's K: 16 of 32 and 20 of 40 layers


class VTWConfig(BaseModel):
    """The VTW part of a model config."""

    model_config = ConfigDict(frozen=True)

    num_layers: int = Field(gt=0)
    default_k: int | None = Field(default=None, ge=1)
    layer_group_size: int = Field(default=DEFAULT_LAYER_GROUP_SIZE, ge=1)
    allowed_k_values: tuple[int, ...] | None = None  # ``vtw_allowed_k``, if given

    @model_validator(mode="after")
    def _check(self) -> VTWConfig:
        n = self.num_layers
        if self.default_k is not None and self.default_k > n:
            raise ValueError(f"vtw_k={self.default_k} is above the number of decoder layers ({n})")
        if self.allowed_k_values is not None:
            bad = [k for k in self.allowed_k_values if not 1 <= k <= n]
            if bad or not self.allowed_k_values:
                raise ValueError(f"vtw_allowed_k must be K values in 1..{n}, got {bad or '[]'}")
            if self.default_k is not None and self.default_k not in self.allowed_k:
                raise ValueError(f"vtw_k={self.default_k} is not in vtw_allowed_k {self.allowed_k}")
        return self

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> VTWConfig:
        text_config = getattr(hf_config, "text_config", hf_config)
        allowed = getattr(hf_config, "vtw_allowed_k", None)
        return cls(
            num_layers=text_config.num_hidden_layers,
            default_k=getattr(hf_config, "vtw_k", None),
            layer_group_size=getattr(hf_config, "vtw_layer_group_size", DEFAULT_LAYER_GROUP_SIZE),
            allowed_k_values=tuple(allowed) if allowed is not None else None,
        )

    @property
    def group_size(self) -> int:
        """Layers per KV group under the group-size rule: divides N and the deployment's K."""
        size = math.gcd(self.layer_group_size, self.num_layers)
        return math.gcd(size, self.default_k) if self.default_k is not None else size

    @property
    def allowed_k(self) -> list[int]:
        """The K values a request may use, N (no withdrawal) always included."""
        if self.allowed_k_values is not None:
            return sorted({*self.allowed_k_values, self.num_layers})
        return list(range(self.group_size, self.num_layers + 1, self.group_size))

    @property
    def group_starts(self) -> list[int]:
        """First decoder layer of each KV cache group."""
        return [0, *(k for k in self.allowed_k if k < self.num_layers)]

    def group_start(self, layer: int) -> int:
        """First layer of the KV cache group holding ``layer``."""
        return max(s for s in self.group_starts if s <= layer)

    def log_layout(self) -> None:
        """Say which K are allowed and what that costs; warn where the gcd rule shrank
        the groups below ``vtw_layer_group_size``."""
        logger.info(
            "VTW: default K=%s, allowed K=%s, %d KV cache groups (layer spans start at %s)",
            self.default_k,
            self.allowed_k,
            len(self.group_starts),
            self.group_starts,
        )
        rule_size = math.gcd(self.layer_group_size, self.num_layers)
        if self.allowed_k_values is None and self.group_size < rule_size:
            logger.warning(
                "VTW: vtw_k=%s is not a multiple of vtw_layer_group_size=%d, so the layer "
                "groups shrink to %d layers: %d KV cache groups instead of %d, each with "
                "its own per-step bookkeeping. Set vtw_allowed_k (e.g. [%s, %d]) to keep "
                "only the groups you use.",
                self.default_k,
                self.layer_group_size,
                self.group_size,
                len(self.group_starts),
                self.num_layers // rule_size,
                self.default_k,
                self.num_layers,
            )

    def resolve_k(self, extra_args: dict[str, Any] | None) -> int:
        """The K of one request: its ``extra_args["vtw_k"]``, else the default, else N.

        Raises ValueError naming the allowed values for anything else.
        """
        value = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if value is None:
            value = self.default_k if self.default_k is not None else self.num_layers
        if isinstance(value, bool) or not isinstance(value, int) or value not in self.allowed_k:
            raise ValueError(
                f"{EXTRA_ARGS_KEY} must be an integer in {self.allowed_k} (the decoder layer "
                f"from which vision tokens are withdrawn; the model's KV layer groups start "
                f"at {self.group_starts}; {self.num_layers} = no withdrawal), got {value!r}"
            )
        return value
