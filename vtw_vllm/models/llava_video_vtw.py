"""LLaVA-OneVision and LLaVA-NeXT-Video with Visual Tokens Withdrawal.

The same contract as :mod:`vtw_vllm.models.llava_vtw`: vLLM's own classes provide the
vision tower, pooling, projector, multimodal processor and weight loading, and
:class:`~vtw_vllm.models.llava_vtw.VTWModelMixin` replaces only the language model's
layer loop (``language_model.model``: vLLM's ``Qwen2Model`` for OneVision, ``LlamaModel``
for NeXT-Video; both have ``layers``, ``norm``, ``embed_input_ids`` and
``layer(positions, hidden, residual)``).

Which tokens are vision tokens: every position inside one of the request's multimodal
placeholder ranges, images and videos alike (:func:`vtw_vllm.vision_ranges.vision_ranges`).
In vLLM 0.32 the processors of both models replace each ``<image>`` / ``<video>`` with a
run of the image / video token id and no ``is_embed`` mask, so every position of a range
receives a vision-tower embedding, and those positions are exactly the prompt's image and
video token ids:

- LLaVA-NeXT-Video: a video is ``frames x ceil(P/s)^2`` tokens (P x P patches, pooling
  stride s; 12 x 12 = 144 per frame for CLIP-336 with s = 2), frames back to back with
  no separator. vLLM serves its videos only (one per prompt; the checkpoint's
  ``image_newline`` is ignored, as vLLM does), so image+video prompts are not possible.
- LLaVA-OneVision: a video is ``frames x ceil(P/2)^2`` bilinear-pooled tokens (14 x 14 =
  196 per frame for SigLIP-384) followed by ONE ``image_newline`` token, all inside the
  range and all withdrawn; an image is the anyres base tile, the unpadded tiles with one
  ``image_newline`` per row, all inside the range and withdrawn. Images and videos may
  share a prompt; each is its own range.

The text between two media items (and the chat template's text) is never withdrawn.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_next_video import LlavaNextVideoForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

from vtw_vllm.models.llava_vtw import VTWModelMixin


class LlavaOnevisionVTWForConditionalGeneration(
    VTWModelMixin, LlavaOnevisionForConditionalGeneration
):
    def _process_video_pixels(self, inputs) -> list[torch.Tensor]:
        """Each video's embedding as ONE 2-D tensor ``[frames x 196 + 1, hidden]``.

        vLLM 0.32's own method returns ``[n, d]`` rows on its tensor path (the videos of
        an encoder batch have equal frame counts) but ``[1, n, d]`` per video on its list
        path (they differ), which ``sanity_check_mm_encoder_outputs`` rejects and the
        engine dies: stock vLLM 0.32 has this defect; the VTW class does not.
        """
        return [
            video.reshape(-1, video.shape[-1]) for video in super()._process_video_pixels(inputs)
        ]


class LlavaNextVideoVTWForConditionalGeneration(
    VTWModelMixin, LlavaNextVideoForConditionalGeneration
):
    pass
