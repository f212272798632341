"""Test helpers: tiny deterministic LLaVA checkpoints, images and videos (see :mod:`.fixtures`)."""

from .fixtures import (
    FIXTURE_VERSION,
    KINDS,
    build_llava,
    build_llava_next,
    build_llava_next_video,
    build_llava_onevision,
    build_tokenizer,
    default_cache_dir,
    get_fixture,
    make_test_image,
    make_test_video,
)
from .video_files import decode_video, mp4_bytes, mp4_data_url

__all__ = [
    "FIXTURE_VERSION",
    "KINDS",
    "build_llava",
    "build_llava_next",
    "build_llava_next_video",
    "build_llava_onevision",
    "build_tokenizer",
    "decode_video",
    "default_cache_dir",
    "get_fixture",
    "make_test_image",
    "make_test_video",
    "mp4_bytes",
    "mp4_data_url",
]
