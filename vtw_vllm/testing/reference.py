"""An independent VTW reference: plain transformers on the same weights, batch 1, no cache.

What the paper (and its authors' code) does: decoder layers with index < K run on the
whole sequence; at layer K every vision-token row is dropped from the hidden states and
the position ids (a row holding the image token id, or for the video models the video
token id: every pooled frame token, and OneVision's newline after each video, carry it);
layers >= K run on the rest with the original positions (M-RoPE models: each kept row's
original 3-D position, as transformers computes it). Qwen3-VL's deepstack features are
added to the vision rows' hidden states after decoder layers 0, 1, ... as in
transformers; a level whose layer comes at or after K has no vision row left to go to and
is dropped with them. Decoding is recomputed from
scratch each step (generated tokens are text, so they are never withdrawn), which is what
a KV-cached VTW decode must equal. Nothing here shares code with the engine path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


class _Captured(Exception):
    pass


@dataclass
class ReferenceResult:
    prompt_token_ids: list[int]
    first_logprobs: torch.Tensor  # [vocab], float32 log-softmax of the first generated token
    token_ids: list[int]  # greedy tokens


@functools.lru_cache(maxsize=2)
def _load(model_dir: str):
    # torch's SDPA with an explicit causal mask (not vLLM's attention): ~5x faster than
    # transformers' "eager" attention on a 2,300-token LLaVA-NeXT prompt here, log-probs
    # within 1e-5 of it.
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@dataclass
class _LanguageModelInputs:
    embeds: torch.Tensor  # [1, T, hidden], image/video features merged in
    positions: torch.Tensor | None  # None: 0..T-1; M-RoPE models: [3, 1, T]
    deepstack: list[torch.Tensor]  # Qwen3-VL: per level [vision rows, hidden]; else []


def _language_model_inputs(model, inputs) -> _LanguageModelInputs:
    """What transformers hands its language model (captured at the language model's
    entry)."""
    captured = {}

    def grab(_module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        captured["positions"] = kwargs.get("position_ids")
        captured["deepstack"] = list(kwargs.get("deepstack_visual_embeds") or [])
        raise _Captured

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    positions = captured["positions"]
    if positions is not None and positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]  # transformers' packed form: text positions first
    return _LanguageModelInputs(captured["embeds"], positions, captured["deepstack"])


def _last_logits_with_withdrawal(
    model,
    embeds,
    is_vision: torch.Tensor,
    k: int,
    positions: torch.Tensor,
    deepstack: list[torch.Tensor],
) -> torch.Tensor:
    """``positions``: ``[1, T]``, or ``[3, 1, T]`` for M-RoPE (each row keeps its own);
    ``deepstack``: features added to the vision rows after layer 0, 1, ... (Qwen3-VL)."""
    lm = model.model.language_model
    hidden = embeds
    mrope = positions.dim() == 3
    for idx, layer in enumerate(lm.layers):
        if idx == k:
            hidden, positions = hidden[:, ~is_vision], positions[..., ~is_vision]
        length = hidden.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        hidden = layer(
            hidden,
            attention_mask=causal,
            position_ids=None if mrope else positions,
            position_embeddings=lm.rotary_emb(hidden, positions),
        )
        if idx < len(deepstack) and idx < k:  # at or past K the vision rows are gone
            hidden = hidden.clone()
            hidden[:, is_vision] += deepstack[idx]
    return model.lm_head(lm.norm(hidden[:, -1]))[0]


@torch.no_grad()
def vtw_generate(
    model_dir: str,
    prompt: str,
    images: list[Image.Image],
    k: int,
    max_tokens: int,
    add_special_tokens: bool = True,  # False for chat-rendered prompts (no BOS), as vLLM
    videos: list[np.ndarray] | None = None,  # [frames, height, width, 3] uint8 each
    video_metadata: list[dict] | None = None,  # per video: fps, frames_indices (Qwen-VL)
) -> ReferenceResult:
    """Greedy VTW generation; ``k >= num_hidden_layers`` is the plain model."""
    model, processor = _load(str(model_dir))
    media = {"images": images or None}
    if videos:
        media["videos"] = list(videos)
    if video_metadata:
        media["video_metadata"] = list(video_metadata)
    inputs = processor(
        text=prompt,
        return_tensors="pt",
        add_special_tokens=add_special_tokens,
        **media,
    )
    prompt_ids = inputs["input_ids"][0]
    lm_inputs = _language_model_inputs(model, inputs)
    embeds, positions = lm_inputs.embeds, lm_inputs.positions
    if positions is None:
        positions = torch.arange(len(prompt_ids))[None]
    vision_ids = [model.config.image_token_id]
    if getattr(model.config, "video_token_id", None) is not None:
        vision_ids.append(model.config.video_token_id)
    is_vision = torch.isin(prompt_ids, torch.tensor(vision_ids))

    tokens: list[int] = []
    first_logprobs = None
    for _ in range(max_tokens):
        logits = _last_logits_with_withdrawal(
            model, embeds, is_vision, k, positions, lm_inputs.deepstack
        )
        if first_logprobs is None:
            first_logprobs = torch.log_softmax(logits.float(), dim=-1)
        token = int(logits.argmax())
        tokens.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        is_vision = torch.cat([is_vision, torch.tensor([False])])
        # A generated token is text: one past the last position (in every M-RoPE section,
        # since a prompt's text after its vision tokens starts past their largest position).
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    return ReferenceResult(prompt_ids.tolist(), first_logprobs, tokens)
