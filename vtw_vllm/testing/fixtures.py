"""Tiny random-init LLaVA checkpoints in the llava-hf layout, for tests without a model hub.

The checkpoints keep the *shapes that matter* for Visual Tokens Withdrawal (576 vision tokens
per LLaVA-1.5 image, a few thousand per anyres LLaVA-NeXT image, 144 per pooled
LLaVA-NeXT-Video frame, 196 per pooled LLaVA-OneVision frame plus its newline token,
grouped-query attention, a multi-layer decoder) while every width is shrunk so that a build
takes seconds and vLLM runs them on CPU. Builds are deterministic from a seed and cached on
disk by :func:`get_fixture`.
"""

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
)

# Bump whenever a build would produce different files: it is part of the cache key.
FIXTURE_VERSION = "1"
KINDS = ("llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen3_vl")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]  # ids 0..4, as in Llama
_VOCAB_SIZE = 1024  # an upper bound: the built-in corpus yields 746 tokens (32064 in LLaVA-1.5)
_INITIALIZER_RANGE = 0.2  # 0.02 in LLaVA: the tiny model would then repeat one token forever
_IMAGE_SIZE = 336
_PATCH_SIZE = 14

# LLaVA-NeXT's anyres resolutions (llava-v1.6 defaults): up to 2x2 tiles of 336 px + base image.
_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# LLaVA-1.5 conversation format, as in llava-hf's chat template; also takes string content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The video fixtures' template: the same format, with a "video" content item as <video>.
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}",
    "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}",
)

# Fixed training text, so the tokenizer (and therefore every fixture) is reproducible.
_CORPUS = """\
USER: <image>
What is shown in this image? ASSISTANT: The image shows a red square on a blue background.
USER: <image>
Describe the picture in detail. ASSISTANT: There are several coloured rectangles. A large green
rectangle covers the left side, a small yellow box sits in the top right corner, and a purple
stripe runs along the bottom edge of the picture.
USER: How many objects can you see? ASSISTANT: I can see three objects: two boxes and a line.
USER: What colour is the sky? ASSISTANT: The sky is light blue with a few white clouds.
A cat is sitting on a wooden table next to a cup of coffee. The morning light comes through the
window and falls on the floor. A dog sleeps under the chair while the children play outside.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Large language models read text as tokens. Vision language models also read images: an image
encoder turns the picture into patches, and a projector maps every patch to a visual token.
The model attends to the visual tokens in the first layers and later relies on the text.
Please answer the question about the image. Is there a person in the photo? No, there is not.
Where is the ball? The ball is in the middle of the field, between the two players.
What time is it? The clock on the wall shows half past seven in the evening.
Colours: red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown, pink.
Shapes: square, rectangle, circle, triangle, line, point, box, stripe, grid, border, corner.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand.
Directions: left, right, top, bottom, above, below, inside, outside, near, far, centre, edge.
"""


def build_tokenizer(video: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the built-in corpus; no download, same ids on every run.

    ``video=True`` adds ``<video>`` as special token id 5 (the video fixtures); without
    it the vocabulary is exactly the image fixtures' one.
    """
    special = _SPECIAL_TOKENS + ([VIDEO_TOKEN] if video else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Prepend BOS like the Llama tokenizer does.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}
        | ({"video_token": VIDEO_TOKEN} if video else {}),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),  # 32064 in LLaVA-1.5-7B
        hidden_size=128,  # 4096 in LLaVA-1.5-7B
        intermediate_size=256,  # 11008
        num_hidden_layers=8,  # 32
        num_attention_heads=4,  # 32; head_dim 32 (128): vLLM's CPU attention needs >= 32
        num_key_value_heads=2,  # 32 (7B is MHA): GQA here exercises the KV-head mapping
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=_INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=_IMAGE_SIZE,  # 336 in CLIP ViT-L/14-336: 24 x 24 = 576 patches
        patch_size=_PATCH_SIZE,  # 14
        hidden_size=64,  # 1024
        intermediate_size=128,  # 4096
        num_hidden_layers=2,  # 24
        num_attention_heads=2,  # 16
        projection_dim=64,  # 768 (unused by LLaVA)
        initializer_range=_INITIALIZER_RANGE,
    )


def _common_config(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vision_config=_vision_config(),
        text_config=_text_config(tokenizer),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )


def _processor_kwargs() -> dict:
    return dict(
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def _image_processor_kwargs() -> dict:
    return dict(size={"shortest_edge": _IMAGE_SIZE}, crop_size=_IMAGE_SIZE)


def _init_model(cls: type[PreTrainedModel], config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """Random-init ``cls`` from ``seed`` without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def _to_llava_hf_layout(out_dir: Path) -> None:
    """Rewrite the weight names to the layout of the llava-hf checkpoints on the hub.

    transformers 5 saves the CLIP tower as ``vision_tower.embeddings...``; the hub files (and
    vLLM's loader, whose CLIP model has a ``vision_model`` child) use
    ``vision_tower.vision_model.embeddings...``. transformers reads both.
    """
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for key, tensor in tensors.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        elif not key.startswith(
            (
                "vision_tower.vision_model.",
                "language_model.",
                "multi_modal_projector.",
                "image_newline",
            )
        ):  # a model loaded from this layout saves in it
            raise RuntimeError(f"unexpected weight name {key!r}: transformers changed its layout")
        renamed[key] = tensor.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})


def _save(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Also the classic preprocessor_config.json that llava-hf repos (and older readers) have.
    processor.image_processor.save_pretrained(out)
    _to_llava_hf_layout(out)
    return out


def build_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a LLaVA-1.5-shaped checkpoint (576 vision tokens per image) to ``out_dir``."""
    tokenizer = build_tokenizer()
    config = LlavaConfig(**_common_config(tokenizer), image_seq_length=576)
    model = _init_model(LlavaForConditionalGeneration, config, seed)
    image_processor = CLIPImageProcessor(**_image_processor_kwargs())
    processor = LlavaProcessor(image_processor, tokenizer, **_processor_kwargs())
    return _save(model, processor, out_dir)


def build_llava_next(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a LLaVA-NeXT-shaped checkpoint (anyres tiling, ~1-3k vision tokens) to ``out_dir``."""
    tokenizer = build_tokenizer()
    config = LlavaNextConfig(**_common_config(tokenizer), image_grid_pinpoints=_GRID_PINPOINTS)
    model = _init_model(LlavaNextForConditionalGeneration, config, seed)
    image_processor = LlavaNextImageProcessor(
        **_image_processor_kwargs(), image_grid_pinpoints=_GRID_PINPOINTS
    )
    processor = LlavaNextProcessor(image_processor, tokenizer, **_processor_kwargs())
    return _save(model, processor, out_dir)


# -- video-capable LLaVA family ----------------------------------------------------------

_NUM_FRAMES = 4  # frames per test video (32 in LLaVA-NeXT-Video's examples)

# LLaVA-OneVision: SigLIP at 384 px / patch 14 = 27 x 27 = 729 patches ("full" strategy,
# last layer), pooled to 14 x 14 = 196 per video frame. Anyres up to 2 x 2 tiles here
# (6 x 6 in llava-onevision-qwen2-*-hf), so an image is at most ~3.7k tokens.
_OV_IMAGE_SIZE = 384
_OV_GRID_PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]


def _video_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(video=True)
    tokenizer.chat_template = VIDEO_CHAT_TEMPLATE
    return tokenizer


def build_llava_next_video(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a LLaVA-NeXT-Video-shaped checkpoint to ``out_dir``: the LLaVA-NeXT model
    (CLIP tower at 336 px, Llama) with average pooling of stride 2, so a video frame is
    12 x 12 = 144 tokens. vLLM serves its videos only (one per prompt), not images."""
    tokenizer = _video_tokenizer()
    config = LlavaNextVideoConfig(
        **_common_config(tokenizer),
        image_grid_pinpoints=_GRID_PINPOINTS,
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        image_seq_length=576,
        video_seq_length=144,
    )
    model = _init_model(LlavaNextVideoForConditionalGeneration, config, seed)
    image_processor = LlavaNextImageProcessor(
        **_image_processor_kwargs(), image_grid_pinpoints=_GRID_PINPOINTS
    )
    video_processor = LlavaNextVideoVideoProcessor(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    kwargs = _processor_kwargs() | {"chat_template": VIDEO_CHAT_TEMPLATE}
    processor = LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        **kwargs,
    )
    return _save(model, processor, out_dir)


def build_llava_onevision(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a LLaVA-OneVision-shaped checkpoint to ``out_dir``: SigLIP tower, Qwen2
    decoder (8 layers, q/k/v biases, tied embeddings as in the 0.5B), anyres images
    (``anyres_max_9``, 2 x 2 tiles at most here) and bilinear-pooled video frames of
    196 tokens followed by one ``image_newline`` token per video."""
    tokenizer = _video_tokenizer()
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),  # 151647 in llava-onevision-qwen2-0.5b-ov-hf
        hidden_size=128,  # 896
        intermediate_size=256,  # 4864
        num_hidden_layers=8,  # 24
        num_attention_heads=4,  # 14; head_dim 32 (64)
        num_key_value_heads=2,  # 2
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=_INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    vision_config = SiglipVisionConfig(
        image_size=_OV_IMAGE_SIZE,  # 384
        patch_size=_PATCH_SIZE,  # 14
        hidden_size=64,  # 1152
        intermediate_size=128,  # 4304
        num_hidden_layers=2,  # 26
        num_attention_heads=2,  # 16
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_OV_GRID_PINPOINTS,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = _init_model(LlavaOnevisionForConditionalGeneration, config, seed)
    size = {"height": _OV_IMAGE_SIZE, "width": _OV_IMAGE_SIZE}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=_OV_GRID_PINPOINTS
    )
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(_OV_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=VIDEO_CHAT_TEMPLATE,
    )
    return _save(model, processor, out_dir)


_BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_next_video": build_llava_next_video,
    "llava_onevision": build_llava_onevision,
}


def default_cache_dir() -> Path:
    """``$VTW_FIXTURE_CACHE``, else ``~/.cache/vtw_vllm/fixtures``."""
    return Path(
        os.environ.get("VTW_FIXTURE_CACHE") or Path.home() / ".cache" / "vtw_vllm" / "fixtures"
    )


def get_fixture(kind: str, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Return the cached checkpoint directory for ``kind`` and ``seed``, building it if needed.

    The build goes to a temporary directory that is renamed into place, so concurrent test
    processes never see a half-written checkpoint; the loser of a race discards its copy.
    """
    from vtw_vllm.testing.qwen_fixtures import build_qwen2_5_vl, build_qwen3_vl

    builders = _BUILDERS | {"qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl}
    if kind not in builders:
        raise ValueError(f"unknown fixture kind {kind!r}; expected one of {KINDS}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{kind}-seed{seed}-v{FIXTURE_VERSION}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        builders[kind](tmp, seed=seed)
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_test_image(seed: int, size: tuple[int, int] = (336, 336)) -> Image.Image:
    """A deterministic RGB image of coloured rectangles, different for every seed."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, x1 = sorted(rng.randrange(width + 1) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height + 1) for _ in range(2))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def make_test_video(
    seed: int, num_frames: int = _NUM_FRAMES, size: tuple[int, int] = (336, 336)
) -> np.ndarray:
    """A deterministic video, ``[num_frames, height, width, 3]`` uint8 (what vLLM and the
    transformers video processors take): a test image whose rectangles drift frame by frame."""
    rng = random.Random(seed)
    width, height = size
    base = make_test_image(seed, size=size)
    frames = []
    for f in range(num_frames):
        frame = base.copy()
        draw = ImageDraw.Draw(frame)
        for _ in range(3):
            x = (rng.randrange(width) + 17 * f) % width
            y = (rng.randrange(height) + 11 * f) % height
            w, h = rng.randint(8, width // 3), rng.randint(8, height // 3)
            draw.rectangle((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
        frames.append(np.asarray(frame, dtype=np.uint8))
    return np.stack(frames)
