"""Tiny random-init Qwen2.5-VL and Qwen3-VL checkpoints in the layout of the hub's
``Qwen/Qwen2.5-VL-*-Instruct`` and ``Qwen/Qwen3-VL-*-Instruct``.

The shapes that matter for VTW are kept: the Qwen vision tower's token counts (14 px
patches, 2 x 2 merged, 2 frames per temporal patch: a 224 x 224 image is 64 tokens, a
448 x 448 image 256, a 4-frame 224 x 224 video 128), M-RoPE over 3-D positions
(temporal, height, width) with its ``mrope_section``, grouped-query attention with q/k/v
biases (Qwen3-VL: q/k norms, interleaved M-RoPE, deepstack features added to the first
decoder layers' outputs, timestamps between video frames), and Qwen's chat format
(``<|im_start|>``, ``<|vision_start|><|image_pad|><|vision_end|>``). Widths are shrunk so
that vLLM runs them on CPU in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vtw_vllm.testing.fixtures import _CORPUS, _INITIALIZER_RANGE, _init_model

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# Qwen's special tokens, in Qwen2.5-VL's order (ids 151643.. there, 0.. here).
_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
]
_VOCAB_SIZE = 1024

# Qwen2-VL's chat template, shortened: no system default, no tool calls; image and video
# items (vLLM passes them as {"type": "image"} / {"type": "video"}) become their pads.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PATCH_SIZE, _MERGE_SIZE, _TEMPORAL_PATCH = 14, 2, 2
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 448 * 448  # at most 256 tokens per image (frame pair)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE on the built-in corpus (in Qwen's chat format) with Qwen's special
    tokens; no BOS, ``<|im_end|>`` as EOS, as in Qwen2.5-VL-Instruct."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS.replace("USER: <image>\n", "<|im_start|>user\n").replace(
        " ASSISTANT: ", "<|im_end|>\n<|im_start|>assistant\n"
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )


def _vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The config fields naming the vision tokens (the same in both families)."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )


def _save(model, processor, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a Qwen2.5-VL-shaped checkpoint to ``out_dir`` (8 decoder layers, hidden 128,
    4 heads / 2 KV heads of dim 32, ``mrope_section`` [4, 6, 6] (16 = head_dim / 2, as
    [16, 24, 24] of 64 in the 7B); a 2-block windowed vision tower)."""
    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer),  # 152064 in Qwen2.5-VL-7B
        hidden_size=128,  # 3584
        intermediate_size=256,  # 18944
        num_hidden_layers=8,  # 28
        num_attention_heads=4,  # 28; head_dim 32 (128)
        num_key_value_heads=2,  # 4
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        initializer_range=_INITIALIZER_RANGE,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=2,  # 32
        hidden_size=64,  # 1280
        intermediate_size=128,  # 3420
        num_heads=2,  # 16
        patch_size=_PATCH_SIZE,
        spatial_merge_size=_MERGE_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH,
        window_size=112,  # as in the 7B: 112 px windows (4 x 4 merged tokens)
        fullatt_block_indexes=[1],  # [7, 15, 23, 31]
        out_hidden_size=128,  # the text hidden size
        initializer_range=_INITIALIZER_RANGE,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        **_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS}
    common = dict(
        size=size,
        patch_size=_PATCH_SIZE,
        merge_size=_MERGE_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=False),
        chat_template=CHAT_TEMPLATE,
    )
    return _save(model, processor, out_dir)


# Qwen3-VL: 16 px patches, 2 x 2 merged (a 448 x 448 image is 196 tokens, a 224 x 224
# one 49), a learned position grid of 48 x 48 interpolated per image, as in the 8B.
_QWEN3_PATCH_SIZE = 16
_QWEN3_MAX_PIXELS = 448 * 448
DEEPSTACK_LEVELS = 3  # deepstack features of 3 vision blocks, into decoder layers 0, 1, 2


def build_qwen3_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a Qwen3-VL-shaped (dense, 8B-like) checkpoint to ``out_dir``: 8 decoder layers,
    hidden 128, 4 heads / 2 KV heads of dim 32 with q/k norms, interleaved
    ``mrope_section`` [6, 5, 5] ([24, 20, 20] of 64 in the 8B); a 3-block vision tower whose
    every block feeds a deepstack level (blocks 8, 16, 24 of 27 in the 8B)."""
    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer),  # 151936 in Qwen3-VL-8B
        hidden_size=128,  # 4096
        intermediate_size=256,  # 12288
        num_hidden_layers=8,  # 36
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 8
        head_dim=32,  # 128
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        initializer_range=_INITIALIZER_RANGE,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=DEEPSTACK_LEVELS,  # 27
        hidden_size=64,  # 1152
        intermediate_size=128,  # 4304
        num_heads=2,  # 16
        patch_size=_QWEN3_PATCH_SIZE,
        spatial_merge_size=_MERGE_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH,
        out_hidden_size=128,  # the text hidden size
        num_position_embeddings=2304,  # 48 x 48, as in the 8B
        deepstack_visual_indexes=list(range(DEEPSTACK_LEVELS)),  # [8, 16, 24]
        initializer_range=_INITIALIZER_RANGE,
    )
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        **_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    model = _init_model(Qwen3VLForConditionalGeneration, config, seed)
    common = dict(
        patch_size=_QWEN3_PATCH_SIZE, merge_size=_MERGE_SIZE, temporal_patch_size=_TEMPORAL_PATCH
    )
    size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _QWEN3_MAX_PIXELS}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            **common, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        # Every frame given is used (vLLM passes decoded frames with their metadata).
        video_processor=Qwen3VLVideoProcessor(
            **common, size=size, do_sample_frames=False, cap_pixels_per_frame=False
        ),
        chat_template=CHAT_TEMPLATE,
    )
    return _save(model, processor, out_dir)


def video_metadata(num_frames: int, fps: float = 24.0) -> dict:
    """vLLM's metadata for a decoded video of ``num_frames`` consecutive frames, which the
    Qwen processors require (``multi_modal_data={"video": (frames, metadata)}``). 24 fps
    is what transformers' Qwen video processor assumes without metadata, so the two give
    the same temporal position ids."""
    return {
        "fps": fps,
        "duration": num_frames / fps,
        "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)),
        "video_backend": "opencv",
    }
