"""Tiny LoRA adapters for the test checkpoints, and the same weights merged into a copy.

An adapter is built here with random but fixed weights (PEFT's on-disk format, which
vLLM's ``LoRARequest`` loads) on the language model's attention projections. Its merged
twin (``W + scale * B @ A`` written into a copy of the base checkpoint) is what the
independent transformers reference runs: VTW with the adapter must equal the reference
on the merged weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The llava-hf layout of the tiny LLaVA fixtures (vtw_vllm.testing.fixtures).
LANGUAGE_LAYER = "language_model.model.layers.{i}.self_attn.{proj}"


def build_lora_pair(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    std: float = 0.05,
) -> tuple[Path, Path]:
    """``(adapter_dir, merged_dir)`` under ``out_dir``: a rank-``rank`` adapter on
    ``targets`` of every language-model layer, and the base checkpoint with it merged.
    ``std`` is large enough to change the tiny model's greedy answers."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    weights = load_file(str(base_dir / "model.safetensors"))
    config = json.loads((base_dir / "config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    adapter, merged = {}, dict(weights)
    for i in range(num_layers):
        for proj in targets:
            name = LANGUAGE_LAYER.format(i=i, proj=proj)
            w = weights[f"{name}.weight"]
            a = torch.randn(rank, w.shape[1], generator=gen) * std
            b = torch.randn(w.shape[0], rank, generator=gen) * std
            adapter[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            adapter[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
            merged[f"{name}.weight"] = (w.float() + scale * b @ a).to(w.dtype).contiguous()

    adapter_dir = out_dir / f"adapter-{seed}"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": list(targets),
                "base_model_name_or_path": str(base_dir),
            }
        )
    )

    merged_dir = out_dir / f"merged-{seed}"
    shutil.copytree(base_dir, merged_dir, dirs_exist_ok=True)
    save_file(merged, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
    return adapter_dir, merged_dir
