"""Test helpers: tiny deterministic LLaVA checkpoints and images (see :mod:`.fixtures`)."""

from .fixtures import (
    FIXTURE_VERSION,
    KINDS,
    build_llava,
    build_llava_next,
    build_tokenizer,
    default_cache_dir,
    get_fixture,
    make_test_image,
)

__all__ = [
    "FIXTURE_VERSION",
    "KINDS",
    "build_llava",
    "build_llava_next",
    "build_tokenizer",
    "default_cache_dir",
    "get_fixture",
    "make_test_image",
]
